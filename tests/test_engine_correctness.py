"""Greedy output equals HF transformers' generate on the same GGUF, token for token."""
from __future__ import annotations

import pytest

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

from hf_reference import hf_greedy

MAX_NEW = 12

TOPICS = ["the history of the printing press", "how bees communicate", "the water cycle",
          "compilers and interpreters", "the rules of chess", "volcanoes", "the Roman road network",
          "photosynthesis", "the invention of the telephone", "ocean tides", "prime numbers"]


def long_prompt(n_sentences: int, seed: int) -> str:
    parts = []
    for i in range(n_sentences):
        topic = TOPICS[(i * 7 + seed) % len(TOPICS)]
        parts.append(f"Note {i + 1}: a short remark about {topic}, written for reader number {seed * 13 + i}.")
    return " ".join(parts) + "\nSummarise the notes above in one sentence:"


PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three colours:",
    long_prompt(8, 1),
    long_prompt(20, 2),
    long_prompt(45, 3),
    long_prompt(70, 4),
]


@pytest.fixture(scope="module")
def prompt_ids(default_model):
    ids = [default_model.tokenizer(p).input_ids for p in PROMPTS]
    assert max(len(i) for i in ids) >= 1400 and min(len(i) for i in ids) < 10
    return ids


@pytest.fixture(scope="module")
def reference(hf_reference, prompt_ids):
    return [hf_greedy(hf_reference, ids, MAX_NEW) for ids in prompt_ids]


def make_llm(loaded, **kw) -> LLM:
    return LLM.from_engine(LLMEngine(EngineConfig(**kw), loaded=loaded))


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_one_at_a_time(default_model, prompt_ids, reference):
    llm = make_llm(default_model, enable_prefix_caching=False)
    got = [token_ids(llm.generate([ids], GREEDY, use_tqdm=False))[0] for ids in prompt_ids]
    assert got == reference


def test_all_in_one_batch_then_prefix_hits(default_model, prompt_ids, reference):
    llm = make_llm(default_model)
    first = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    assert token_ids(first) == reference
    assert all(o.num_cached_tokens == 0 for o in first)
    second = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    assert token_ids(second) == reference
    for ids, out in zip(prompt_ids, second):
        # Every full block of the prompt but the one holding the last token is a hit.
        assert out.num_cached_tokens == (len(ids) - 1) // 16 * 16
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits_total == sum(o.num_cached_tokens for o in second)


def test_chunked_prefill_mixed_with_decodes(default_model, prompt_ids, reference):
    llm = make_llm(default_model, max_num_batched_tokens=96, enable_prefix_caching=False)
    assert token_ids(llm.generate(prompt_ids, GREEDY, use_tqdm=False)) == reference


def test_preemption_under_a_tiny_pool(default_model, prompt_ids, reference):
    # 100 blocks of 16 tokens: the longest prompt alone takes ~95 of them.
    llm = make_llm(default_model, num_gpu_blocks_override=100, max_num_batched_tokens=256)
    assert token_ids(llm.generate(prompt_ids, GREEDY, use_tqdm=False)) == reference
    assert llm.engine.stats().num_preemptions_total > 0


def test_request_larger_than_the_pool_is_rejected(default_model):
    from kvtier.engine.errors import RequestError
    llm = make_llm(default_model, num_gpu_blocks_override=8)
    with pytest.raises(RequestError, match="pool holds 8"):
        llm.generate(["hello " * 200], GREEDY, use_tqdm=False)
    # The engine still serves what fits.
    assert llm.generate(["hello"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
