"""KV cache events in vLLM's format, for KV-aware routing.

`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558", "topic": ""}'`

What goes on the wire is what vLLM sends (its `vllm.distributed.kv_events`,
as of 0.33), so a consumer written for vLLM decodes it unchanged:
- a ZMQ PUB socket; each message is three frames: topic, an 8-byte big-endian
  sequence number (from 0), and an msgpack payload;
- the payload is an EventBatch, [ts, events, data_parallel_rank], each event a
  map tagged by "type": BlockStored, BlockRemoved or AllBlocksCleared;
- a ROUTER replay socket: a client sends the first sequence number it wants
  (8 bytes, big-endian); every batch still buffered from there comes back as
  [topic, seq, payload], then an end marker [b"", -1 (8 bytes), b""].

`medium` says where the block now lives: "device" (the engine's pool), or the
kind of tier ("cpu", "fs", "obj", "redis", "store"). Block hashes are the
engine's chained SHA-256 block hashes (32 bytes), one per device block.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from itertools import count
from typing import Any, Literal

import msgspec
import zmq
from pydantic import BaseModel, ConfigDict, PositiveInt

logger = logging.getLogger("kvtier.connectors")

DEVICE = "device"


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the events: a map with "type" naming the class."""


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None  # "full_attention" | "sliding_window"
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def stored(block_hashes: list[bytes], parent: bytes | None, token_ids: list[int], block_size: int, medium: str,
           group: int, window: int | None) -> BlockStored:
    return BlockStored(block_hashes=block_hashes, parent_block_hash=parent, token_ids=token_ids,
                       block_size=block_size, lora_id=None, medium=medium, lora_name=None, group_idx=group,
                       kv_cache_spec_kind="sliding_window" if window else "full_attention",
                       kv_cache_spec_sliding_window=window)


def removed(block_hashes: list[bytes], medium: str, group: int) -> BlockRemoved:
    return BlockRemoved(block_hashes=block_hashes, medium=medium, group_idx=group)


ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(KVEventBatch)


class KVEventsConfig(BaseModel):
    """vLLM's KVEventsConfig."""
    model_config = ConfigDict(extra="forbid")

    enable_kv_cache_events: bool = False
    publisher: Literal["null", "zmq"] | None = None  # None: zmq when enabled
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: PositiveInt = 10_000  # batches kept for replay
    hwm: PositiveInt = 100_000
    max_queue_size: PositiveInt = 100_000  # batches waiting to be sent; past it they are dropped, counted
    topic: str = ""

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and (self.publisher or "zmq") == "zmq"


class ZmqEventPublisher:
    """PUB socket plus a ROUTER for replays, served by one thread: the step
    loop only puts batches on a bounded queue."""

    END_SEQ = (-1).to_bytes(8, "big", signed=True)

    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0) -> None:
        self.config = config
        self.rank = data_parallel_rank
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._topic = config.topic.encode()
        self._seq = count()
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._open(self._pub, config.endpoint)
        self._replay = None
        if config.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.set_hwm(2 * (config.buffer_steps + 1))
            self._replay.bind(config.replay_endpoint)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    @staticmethod
    def _open(socket: zmq.Socket, endpoint: str) -> None:
        # As vLLM: a wildcard or local endpoint is ours to bind; anything else is a collector to connect to.
        if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
            socket.bind(endpoint)
        else:
            socket.connect(endpoint)

    def publish(self, events: list) -> None:
        if not events:
            return
        try:
            self._queue.put_nowait(KVEventBatch(ts=time.time(), events=events, data_parallel_rank=self.rank))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while self._running or not self._queue.empty():
            if self._replay is not None and self._replay.poll(0):
                try:
                    self._serve_replay()
                except Exception:
                    logger.exception("KV events replay failed")
            try:
                batch = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if batch is None:
                break
            seq = next(self._seq)
            payload = ENCODER.encode(batch)
            try:
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            except zmq.ZMQError:
                logger.exception("publishing KV events failed")
            self._buffer.append((seq, payload))

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            logger.warning("KV events: a malformed replay request (%d frames)", len(frames))
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= start_seq:
                self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", self.END_SEQ, b""))

    def shutdown(self) -> None:
        self._running = False
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=2)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)


def make_publisher(config: KVEventsConfig | None) -> ZmqEventPublisher | None:
    return ZmqEventPublisher(config) if config is not None and config.active else None


__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "DECODER", "DEVICE", "EventBatch", "KVEventBatch",
           "KVEventsConfig", "ZmqEventPublisher", "make_publisher", "removed", "stored"]
