"""Hybrid memory allocator end to end: tiny random sliding-window models saved by HF
transformers, loaded by kvtier, compared with HF generate token for token."""
from __future__ import annotations

import pytest
import torch

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

from hf_reference import hf_greedy
from tiny_models import save_tiny

WINDOW = 32
MAX_NEW = 10
PROMPT_LENS = [9, 40, 120, 250, 400]


@pytest.fixture(scope="module", params=["qwen2-hybrid", "mistral-all-sliding"])
def tiny_model(request, tmp_path_factory, default_model):
    hf, loaded = save_tiny(request.param, tmp_path_factory.mktemp(request.param), default_model.tokenizer,
                           window=WINDOW)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in PROMPT_LENS]
    reference = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    return request.param, loaded, prompts, reference


def run(loaded, prompts, **kw):
    llm = LLM.from_engine(LLMEngine(EngineConfig(**kw), loaded=loaded))
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return llm, sp


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_layer_types_and_groups(tiny_model):
    kind, loaded, _, _ = tiny_model
    llm, _ = run(loaded, [])
    specs = [type(g.spec).__name__ for g in llm.engine.groups]
    if kind == "qwen2-hybrid":
        assert loaded.config.layer_types == ["sliding_attention", "full_attention"] * 2
        assert specs == ["FullAttentionSpec", "SlidingWindowSpec"]
    else:
        assert specs == ["SlidingWindowSpec"]


def test_one_at_a_time_batched_chunked_and_cached(tiny_model):
    kind, loaded, prompts, reference = tiny_model
    llm, sp = run(loaded, prompts, enable_prefix_caching=False)
    assert [ids(llm.generate([p], sp, use_tqdm=False))[0] for p in prompts] == reference

    llm, sp = run(loaded, prompts, max_num_batched_tokens=48)
    first = llm.generate(prompts, sp, use_tqdm=False)
    assert ids(first) == reference
    second = llm.generate(prompts, sp, use_tqdm=False)
    assert ids(second) == reference
    for p, out in zip(prompts, second):
        assert out.num_cached_tokens == (len(p) - 1) // 16 * 16


def test_sliding_groups_hold_only_the_window(tiny_model):
    kind, loaded, prompts, _ = tiny_model
    llm, sp = run(loaded, prompts, max_num_batched_tokens=64, enable_prefix_caching=False)
    engine = llm.engine
    engine.add_request("long", prompts[-1], sp)
    peak = [0] * len(engine.groups)
    while engine.has_unfinished_requests():
        engine.step()
        held = engine.kv_cache_manager.block_ids("long")
        for g, table in enumerate(held):
            peak[g] = max(peak[g], sum(1 for b in table if b != 0))
    bs = engine.block_size
    total_blocks = -(-(len(prompts[-1]) + MAX_NEW) // bs)
    for g, group in enumerate(engine.groups):
        if type(group.spec).__name__ == "SlidingWindowSpec":
            # The window plus one 64-token chunk, plus a partial block at each end.
            assert peak[g] <= -(-(WINDOW + 64) // bs) + 1 < total_blocks
        else:
            assert peak[g] == total_blocks
    assert engine.kv_cache_manager.pool.num_free_blocks == engine.num_blocks - 1


def test_offloading_stores_and_loads_only_what_each_group_needs(tiny_model):
    kind, loaded, prompts, reference = tiny_model
    ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"cpu_bytes_to_use": 64_000_000, "block_size": 32}}
    llm, sp = run(loaded, prompts, kv_transfer_config=ktc, max_num_batched_tokens=48)
    assert ids(llm.generate(prompts, sp, use_tqdm=False)) == reference
    connector = llm.engine.connector
    assert connector.store.flush(60)
    assert llm.engine.kv_cache_manager.pool.reset_prefix_cache()
    second = llm.generate(prompts, sp, use_tqdm=False)
    assert ids(second) == reference
    for p, out in zip(prompts, second):
        # Every whole 32-token block of the prompt, short of the last token (recomputed).
        assert out.num_cached_tokens == min(len(p) // 32 * 32, len(p) - 1)
    # A sliding group only loads the offload blocks its window reaches at the hit boundary.
    block_bytes = torch.Size(connector.block_shape).numel() * 4
    expected = 0
    for p in prompts:
        hit = len(p) // 32
        for g in llm.engine.groups:
            needed = connector.blocks.needed(g.index, 0, hit, len(p))
            if type(g.spec).__name__ == "SlidingWindowSpec":
                assert len(needed) == min(hit, 1)  # a 32-token window lies in the last 32-token block
            expected += len(needed) * block_bytes
    assert connector.stats()["cpu"]["bytes_out"] == expected
    llm.engine.shutdown()
