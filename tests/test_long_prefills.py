"""--long-prefill-token-threshold and the partial-prefill limits: a short request
is not scheduled behind another's whole long prefill, a long prefill held back
keeps its place, and no output changes."""
from __future__ import annotations

import pytest

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.kv_cache import KVCacheManager, build_kv_cache_groups
from kvtier.engine.core.request import Request, RequestStatus
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.core.scheduler import PrefillLimits, Scheduler
from kvtier.engine.entrypoints.cli import build_parser, engine_config_from_args
from kvtier.engine.llm_engine import LLMEngine

from hf_reference import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def scheduler(limits: PrefillLimits, budget: int = 512, blocks: int = 400, caching: bool = True) -> Scheduler:
    kv = KVCacheManager(build_kv_cache_groups(["full_attention"], None), blocks, 16, enable_caching=caching)
    return Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=4096,
                     prefill_limits=limits)


def request(rid: str, n: int) -> Request:
    return Request(rid, [100 + (hash(rid) + i) % 5000 for i in range(n)], GREEDY, 4, 16)


def step(s: Scheduler) -> dict[str, int]:
    out = s.schedule()
    sampled = [c.request for c in out.scheduled if c.completes_prompt]
    s.update_after_step(out)
    for req in sampled:  # a prompt that completes samples a token, as the engine does
        req.append_token(7, None)
    return {c.request.request_id: c.num_new_tokens for c in out.scheduled}


def test_a_long_prefill_is_cut_into_threshold_chunks_beside_a_short_one():
    s = scheduler(PrefillLimits(long_threshold=64))
    s.add(request("long", 1000))
    s.add(request("short", 40))
    assert step(s) == {"long": 64, "short": 40}
    assert step(s) == {"short": 1, "long": 64}  # the decode goes first


def test_without_a_threshold_the_long_prefill_takes_the_budget():
    s = scheduler(PrefillLimits())
    s.add(request("long", 1000))
    s.add(request("short", 40))
    assert step(s) == {"long": 512}  # the short one waits for the long one's chunks


def test_only_max_long_partial_prefills_long_ones_run_and_the_others_keep_their_place():
    s = scheduler(PrefillLimits(long_threshold=64, max_partial=2, max_long=1))
    for rid in ("a", "b", "c"):
        s.add(request(rid, 300))
    s.add(request("short", 20))
    assert step(s) == {"a": 64, "short": 20}  # b and c (long) are held back, short jumps them
    seen = []
    while s.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
        chunks = step(s)
        long_chunks = [rid for rid, n in chunks.items() if n == 64]  # a long prefill's, not its last (44)
        assert len(long_chunks) <= 1
        seen.extend(rid for rid in long_chunks if rid not in seen)
    assert seen == ["a", "b", "c"]  # in arrival order


def test_max_num_partial_prefills_counts_prefills_cut_by_the_budget():
    # Budget 100 and threshold 64: "x" (64 of 90) is long and partial; "y" (50)
    # would be cut to 36 by the budget, a second partial prefill: held back.
    s = scheduler(PrefillLimits(long_threshold=64, max_partial=1, max_long=1), budget=100)
    s.add(request("x", 90))
    s.add(request("y", 50))
    assert step(s) == {"x": 64}
    assert step(s) == {"x": 26, "y": 50}


def test_a_waiting_request_holding_blocks_cannot_starve_the_long_prefill_that_holds_it_back():
    # Fuzz seed 13394: a tier load landed for "landed" (304 of 330 tokens, 19
    # blocks), which then waits: its last 26 tokens are a long prefill and the
    # one long slot is "a"'s. "a" needs 26 blocks, the pool has 39: it fell
    # short, preempted itself, started again (its prefix no longer cached: a
    # hybrid model's sliding group had dropped it; here no prefix caching at
    # all) and fell short again, for ever.
    s = scheduler(PrefillLimits(long_threshold=16, max_partial=2, max_long=1), budget=128, blocks=40, caching=False)
    s.add(request("a", 400))
    assert step(s) == {"a": 16}
    landed = request("landed", 330)
    s.add(landed)
    s.waiting.remove(landed)
    assert s.kv_cache.allocate_slots("landed", 0, 304)  # as Scheduler._land leaves it: blocks, computed, waiting
    landed.num_computed_tokens = 304
    s._enqueue(landed, front=True)
    finished = set()
    for _ in range(200):
        step(s)
        finished |= {r.request_id for r in s.running if len(r.output_token_ids) >= 4}
        for r in [r for r in s.running if r.request_id in finished]:
            s.finish(r, RequestStatus.FINISHED_LENGTH)
        if finished == {"a", "landed"}:
            break
    assert finished == {"a", "landed"}, f"stuck: running {[r.request_id for r in s.running]}, " \
        f"waiting {[(r.request_id, r.num_computed_tokens) for r in s.waiting]}"


def test_bad_limits_stop_start_up_with_the_field_named():
    with pytest.raises(ValueError, match="max_long_partial_prefills"):
        EngineConfig(long_prefill_token_threshold=64, max_num_partial_prefills=1, max_long_partial_prefills=2)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(long_prefill_token_threshold=-1)
    args = build_parser().parse_args(["serve", "--long-prefill-token-threshold", "256",
                                      "--max-num-partial-prefills", "2", "--max-long-partial-prefills", "1"])
    cfg = engine_config_from_args(args)
    assert (cfg.long_prefill_token_threshold, cfg.max_num_partial_prefills, cfg.max_long_partial_prefills) == (256, 2, 1)


def run_engine(default_model, prompts: list[list[int]], **kw) -> tuple[dict, dict]:
    """Outputs, and how many tokens the step that gave each request its first token computed."""
    engine = LLMEngine(EngineConfig(**kw), loaded=default_model)
    schedule, last = engine.scheduler.schedule, {}

    def recording_schedule():
        out = schedule()
        last["tokens"] = out.total_tokens
        return out
    engine.scheduler.schedule = recording_schedule
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    outputs, first_step_tokens = {}, {}
    for _ in range(500):  # a request that is never sampled would spin here
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.outputs[0].token_ids and out.request_id not in first_step_tokens:
                first_step_tokens[out.request_id] = last["tokens"]
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    assert not engine.has_unfinished_requests(), f"unfinished after 500 steps: {sorted(engine.requests)}"
    engine.shutdown()
    return outputs, first_step_tokens


def test_outputs_are_unchanged_and_the_short_request_is_not_stuck_behind_the_long_one(default_model, hf_reference):
    tok = default_model.tokenizer
    # 280 tokens: its first 160-token chunk is partial, and 160 + 160 would cover it
    # (a chunk whose "complete" is judged after the step advanced it took the
    # short request's token: seed 104 of the fuzz).
    long_prompt = tok(" ".join(f"Row {i}: {i * 7 % 31} units." for i in range(30))).input_ids
    short_prompt = tok("The capital of France is").input_ids
    prompts = [long_prompt, short_prompt]
    plain, plain_steps = run_engine(default_model, prompts, max_num_batched_tokens=2048)
    capped, capped_steps = run_engine(default_model, prompts, max_num_batched_tokens=2048,
                                      long_prefill_token_threshold=160)
    assert capped == plain
    for i, p in enumerate(prompts):
        assert capped[str(i)] == hf_greedy(hf_reference, p, GREEDY.max_tokens)
    # The short request's first token: without the cap it comes from a step that
    # also computed the whole long prompt; with it, from a step of at most 160 + its own.
    assert plain_steps["1"] >= len(long_prompt)
    assert capped_steps["1"] <= 160 + len(short_prompt)
