"""--kv-cache-dtype: a 16-bit KV cache under a float32 model halves the bytes in
the device pool and in every tier, and a hit from any tier gives exactly the
output of the same engine with no connector (a 16-bit cache is not HF's
arithmetic; the engine with no connector is the reference, and equal bytes
make that a hard test)."""
from __future__ import annotations

import uuid

import engines
import pytest
import torch

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.cli import build_parser, engine_config_from_args
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
OFFLOAD_TOKENS = 32


def text(n: int, seed: int) -> str:
    return " ".join(f"Entry {seed}-{i}: {i * seed % 89} boxes weigh {i + seed} kg." for i in range(n))


PROMPT = text(24, 5)                     # ~400 tokens
OTHER = [text(24, s) for s in (19, 23, 29)]  # enough to push PROMPT out of a 48-block pool

def make_llm(loaded, kv_cache_dtype: str, secondary: list[dict] | None = None, **kw) -> LLM:
    ktc = None
    if secondary is not None:
        extra = {"cpu_bytes_to_use": 64 << 20, "block_size": OFFLOAD_TOKENS}
        if secondary:
            extra.update(spec_name="TieringOffloadingSpec", secondary_tiers=secondary)
        ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}
    kw.setdefault("num_gpu_blocks_override", 48)
    engine = LLMEngine(EngineConfig(kv_cache_dtype=kv_cache_dtype, kv_transfer_config=ktc, **kw), loaded=loaded)
    engines.track(engine)
    return LLM.from_engine(engine)


def run(llm: LLM, prompt: str = PROMPT):
    return llm.generate([prompt], GREEDY, use_tqdm=False)[0]


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def reference(request, default_model):
    """The same 16-bit engine with no connector: its outputs for PROMPT, and for
    PROMPT again after OTHER pushed it out of the pool (recomputed)."""
    llm = make_llm(default_model, request.param)
    first = run(llm)
    for p in OTHER:
        run(llm, p)
    again = run(llm)
    assert again.num_cached_tokens == 0, "the reference's pool still held the prompt"
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    llm.engine.shutdown()
    return request.param, first.outputs[0].token_ids, len(first.prompt_token_ids)


def test_a_16_bit_cache_halves_the_pool_and_tier_bytes(default_model):
    full = make_llm(default_model, "auto", [], num_gpu_blocks_override=None, cpu_kv_cache_bytes=64 << 20)
    half = make_llm(default_model, "float16", [], num_gpu_blocks_override=None, cpu_kv_cache_bytes=64 << 20)
    assert full.engine.runner.kv_cache.dtype == torch.float32
    assert half.engine.runner.kv_cache.dtype == torch.float16
    assert half.engine.model.dtype == torch.float32  # the weights and activations stay float32
    # The same byte budget holds twice the pages (budget // page bytes, either way).
    assert half.engine.num_blocks // 2 == full.engine.num_blocks
    f_cpu, h_cpu = full.engine.connector.store.cpu, half.engine.connector.store.cpu
    assert h_cpu.block_nbytes * 2 == f_cpu.block_nbytes
    assert h_cpu.dtype == torch.float16


def _secondary(kind: str, tmp_path, request) -> list[dict]:
    unique = uuid.uuid4().hex[:8]
    if kind == "cpu":
        return []
    if kind == "fs":
        return [{"type": "fs", "path": str(tmp_path / f"fs-{unique}")}]
    if kind == "redis":
        return [{"type": "redis", "url": request.getfixturevalue("redis_srv").url, "key_prefix": f"d{unique}:",
                 "timeout_s": 60.0}]
    if kind == "s3":
        s3 = request.getfixturevalue("s3_srv")
        return [s3.tier_spec(s3.create_bucket(f"kvd-{unique}"), timeout_s=60.0)]
    return [request.getfixturevalue("store_srv").tier_spec(timeout_s=60.0)]


@pytest.mark.parametrize("kind", ["cpu", "fs", "redis", "s3", "store"])
def test_a_hit_from_every_tier_equals_no_connector(default_model, reference, kind, tmp_path, request):
    dtype, tokens, n = reference
    secondary = _secondary(kind, tmp_path, request)
    writer = make_llm(default_model, dtype, secondary)
    assert run(writer).outputs[0].token_ids == tokens
    for p in OTHER:  # out of the device pool: the next PROMPT is served by a tier
        run(writer, p)
    assert writer.engine.connector.store.flush(60)
    # cpu: the same engine reads its CPU tier; the others: a fresh replica reads the secondary tier.
    reader = writer if kind == "cpu" else make_llm(default_model, dtype, secondary)
    if reader is not writer:
        writer.engine.shutdown()
    name = "cpu" if kind == "cpu" else next(t for t in reader.engine.stats().tiers if t != "cpu")
    before = reader.engine.stats().tiers[name]["bytes_out"]
    warm = run(reader)
    assert warm.outputs[0].token_ids == tokens
    assert warm.num_cached_tokens >= (n - 1) // OFFLOAD_TOKENS * OFFLOAD_TOKENS
    served = reader.engine.stats().tiers[name]["bytes_out"] - before
    block = reader.engine.connector.store.cpu.block_nbytes
    assert served >= warm.num_cached_tokens // OFFLOAD_TOKENS * block


def test_a_cache_of_another_dtype_is_a_miss(default_model, reference, tmp_path, hf_reference):
    """Replicas with different --kv-cache-dtype share a directory: neither reads
    the other's blocks (the layout id carries the dtype), and the float32 one
    still equals HF."""
    from hf_reference import hf_greedy
    dtype, _, _ = reference
    shared = [{"type": "fs", "path": str(tmp_path / "shared")}]
    half = make_llm(default_model, dtype, shared)
    run(half)
    assert half.engine.connector.store.flush(60)
    full = make_llm(default_model, "float32", shared)
    out = run(full)
    assert out.num_cached_tokens == 0
    fs_name = next(t for t in full.engine.stats().tiers if t != "cpu")
    assert full.engine.stats().tiers[fs_name]["bytes_out"] == 0
    assert out.outputs[0].token_ids == hf_greedy(hf_reference, list(out.prompt_token_ids), GREEDY.max_tokens)


def test_the_flag_reaches_the_engine_config_and_bad_values_stop_start_up(capsys):
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "bfloat16"])
    assert engine_config_from_args(args).kv_cache_dtype == "bfloat16"
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--kv-cache-dtype", "fp4"])
    assert exc.value.code == 2
    assert "--kv-cache-dtype" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")
