"""Sampling behaviour through the engine: seeds, top-k/top-p, stops, n, logprobs."""
from __future__ import annotations

import math

import pytest

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def llm(default_model):
    return LLM.from_engine(LLMEngine(EngineConfig(), loaded=default_model))


def tokens(llm, **kw):
    return llm.generate([PROMPT], SamplingParams(**kw), use_tqdm=False)[0]


def test_seed_makes_sampling_reproducible(llm):
    a = tokens(llm, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True).outputs[0].token_ids
    b = tokens(llm, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True).outputs[0].token_ids
    c = tokens(llm, temperature=1.0, seed=8, max_tokens=12, ignore_eos=True).outputs[0].token_ids
    assert a == b and a != c


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = tokens(llm, temperature=0.0, max_tokens=10).outputs[0].token_ids
    assert tokens(llm, temperature=0.8, top_k=1, seed=1, max_tokens=10).outputs[0].token_ids == greedy
    assert tokens(llm, temperature=0.8, top_p=1e-6, seed=2, max_tokens=10).outputs[0].token_ids == greedy


def test_n_choices_differ_and_share_the_prompt(llm):
    out = tokens(llm, n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)


def test_stop_token_and_stop_string(llm):
    greedy = tokens(llm, temperature=0.0, max_tokens=16, ignore_eos=True).outputs[0]
    stop_id = greedy.token_ids[3]
    out = tokens(llm, temperature=0.0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id]).outputs[0]
    first = greedy.token_ids.index(stop_id)
    assert out.token_ids == greedy.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    word = greedy.text.split()[2]
    cut = tokens(llm, temperature=0.0, max_tokens=16, ignore_eos=True, stop=[word]).outputs[0]
    assert cut.text == greedy.text[:greedy.text.index(word)]
    assert cut.finish_reason == "stop" and cut.stop_reason == word


def test_logprobs_are_normalised_and_include_the_sampled_token(llm):
    out = tokens(llm, temperature=0.0, max_tokens=5, logprobs=3).outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and len(entry) >= 3
        assert entry[tok] == max(entry.values())  # greedy picks the most likely
        assert sum(math.exp(v) for v in entry.values()) <= 1.0 + 1e-4
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_max_tokens_and_eos(llm):
    out = tokens(llm, temperature=0.0, max_tokens=3).outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=64),
                    use_tqdm=False)[0].outputs[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in chat.text


def test_outputs_carry_request_timestamps_in_order(llm):
    out = llm.generate(["Count to five:"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.ttft == m.first_token_time - m.arrival_time > 0
    assert m.time_in_queue >= 0
