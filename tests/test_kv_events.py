"""KV events in vLLM's wire format: a pyzmq subscriber decodes them and follows
one block from the device pool to the CPU tier and out again; replay serves
what was missed."""
from __future__ import annotations

import time

import msgspec
import pytest
import zmq

from kvtier.connectors.kv_events import KVEventBatch
from kvtier.engine.config import EngineConfig
from kvtier.engine.core.request import Request
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

import servers

GREEDY = SamplingParams(temperature=0.0, max_tokens=2)


def text(seed: int) -> str:
    return " ".join(f"Entry {seed}-{i}: {i * seed % 89} owls." for i in range(40))


# Decoded with msgspec's schema-less decoder, as a consumer that knows only
# vLLM's documented layout would see it.
def plain(payload: bytes):
    ts, events, rank = msgspec.msgpack.decode(payload)
    return ts, events, rank


@pytest.fixture
def engine_with_events(default_model):
    pub, replay = servers.free_port(), servers.free_port()
    ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"num_cpu_blocks": 6, "block_size": 64}}
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub}",
              "replay_endpoint": f"tcp://*:{replay}", "topic": "kv"}
    engine = LLMEngine(EngineConfig(kv_transfer_config=ktc, kv_events_config=events, num_gpu_blocks_override=80),
                       loaded=default_model)
    yield engine, pub, replay
    engine.shutdown()


def test_a_block_from_device_to_tier_to_eviction(engine_with_events):
    engine, pub, replay = engine_with_events
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{pub}")
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    time.sleep(0.3)  # a PUB socket drops what it sends before the subscriber has joined
    llm = LLM.from_engine(engine)
    first = text(3)
    llm.generate([first], GREEDY, use_tqdm=False)
    assert engine.connector.store.flush(30)
    for seed in (5, 7, 11, 13):  # push the first prompt out of the device pool and the 6-block CPU tier
        llm.generate([text(seed)], GREEDY, use_tqdm=False)
        assert engine.connector.store.flush(30)
    llm.generate([text(17)], GREEDY, use_tqdm=False)  # the last batches go out with this step
    time.sleep(0.3)

    live, seqs = [], []
    while sub.poll(200):
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"kv"
        seqs.append(int.from_bytes(seq, "big"))
        live.append(msgspec.msgpack.decode(payload, type=KVEventBatch))
        assert plain(payload)[1][0]["type"] in ("BlockStored", "BlockRemoved", "AllBlocksCleared")
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # in order, none missing
    events = [e for batch in live for e in batch.events]

    hashes = Request("x", engine.tokenizer(first).input_ids, GREEDY, 8, engine.block_size).block_hashes
    block = hashes[3]  # the last device block of the first 64-token offload block
    trail = [(type(e).__name__, e.medium) for e in events if block in e.block_hashes]
    assert trail[0] == ("BlockStored", "device")
    assert ("BlockStored", "cpu") in trail and ("BlockRemoved", "cpu") in trail
    assert ("BlockRemoved", "device") in trail
    assert trail.index(("BlockStored", "cpu")) < trail.index(("BlockRemoved", "cpu"))
    stored = next(e for e in events if type(e).__name__ == "BlockStored" and e.medium == "device"
                  and e.block_hashes[0] == hashes[0])
    assert stored.parent_block_hash is None and stored.block_size == engine.block_size
    assert stored.token_ids[:engine.block_size] == engine.tokenizer(first).input_ids[:engine.block_size]
    assert stored.group_idx == 0 and stored.kv_cache_spec_kind == "full_attention"

    # Replay from the start: every batch still buffered, then the end marker.
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{replay}")
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    replayed = []
    while dealer.poll(5000):
        _, topic, seq, payload = dealer.recv_multipart()
        if seq == (-1).to_bytes(8, "big", signed=True):
            break
        replayed.append(int.from_bytes(seq, "big"))
    assert replayed[0] == 0 and replayed[-1] >= seqs[-1] and replayed == sorted(replayed)
    sub.close(0)
    dealer.close(0)


def test_resetting_the_prefix_cache_is_one_all_blocks_cleared(default_model):
    port = servers.free_port()
    engine = LLMEngine(EngineConfig(kv_events_config={"enable_kv_cache_events": True,
                                                      "endpoint": f"tcp://*:{port}"}), loaded=default_model)
    try:
        LLM.from_engine(engine).generate([text(2)], GREEDY, use_tqdm=False)
        engine.kv_cache_manager.take_events()
        assert engine.kv_cache_manager.pool.reset_prefix_cache()
        assert [type(e).__name__ for e in engine.kv_cache_manager.take_events()] == ["AllBlocksCleared"]
    finally:
        engine.shutdown()


def test_a_bad_events_config_names_the_field():
    with pytest.raises(ValueError, match="kv_events_config.publisher"):
        EngineConfig(kv_events_config={"enable_kv_cache_events": True, "publisher": "kafka"})
    with pytest.raises(ValueError, match="did you mean endpoint"):
        EngineConfig(kv_events_config='{"endpont": "tcp://*:1"}')
