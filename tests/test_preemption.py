"""Preemption at block granularity, and priority scheduling.

An overloaded pool (the workload needs 2-3x the device blocks) forces
preemption. In swap mode a victim gives up only the blocks the step lacks,
from its tail; their KV (prompt or generated, the partial last block too)
waits in the CPU tier, pinned, and loads back when the victim resumes. Every
greedy output must equal the run with an unconstrained pool, in either mode,
and HF transformers on a sample."""
from __future__ import annotations

import engines
import pytest
import torch

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.request import RequestStatus
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine
from kvtier.kvstore.validation import ConfigError

from hf_reference import hf_greedy
from tiny_models import save_tiny


def offloading(cpu_bytes: int = 256 << 20, **extra) -> dict:
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": cpu_bytes, "block_size": 64, **extra}}


def engine(loaded, **kw) -> LLMEngine:
    e = LLMEngine(EngineConfig(**kw), loaded=loaded)
    engines.track(e)
    return e


def generate(e: LLMEngine, prompts, max_tokens: int, **kw) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in LLM.from_engine(e).generate(prompts, sp, use_tqdm=False, **kw)]


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (length + 7 * i,), generator=g).tolist() for i in range(n)]


def overloaded(loaded, prompts, max_tokens, pool_blocks, **kw):
    """(swap engine, swap outputs, recompute engine, recompute outputs) on a pool of `pool_blocks`."""
    common = dict(num_gpu_blocks_override=pool_blocks, max_num_batched_tokens=512, **kw)
    swap = engine(loaded, kv_transfer_config=offloading(), **common)
    assert swap.preemption_mode == "swap"  # the default with a CPU tier
    swapped = generate(swap, prompts, max_tokens)
    recompute = engine(loaded, kv_transfer_config=offloading(), preemption_mode="recompute", **common)
    recomputed = generate(recompute, prompts, max_tokens)
    return swap, swapped, recompute, recomputed


def check_overload(reference, swap, swapped, recompute, recomputed) -> None:
    assert swapped == reference
    assert recomputed == reference
    s, r = swap.stats(), recompute.stats()
    assert s.num_preemptions_total > 0 and r.num_preemptions_total > 0
    assert s.preemption_swapped_out_blocks_total > 0
    assert s.preemption_swapped_in_blocks_total > 0
    assert s.restore.count > 0
    assert r.preemption_swapped_out_blocks_total == 0
    # Swap recomputes a small fraction of what recompute mode does.
    assert r.preemption_recomputed_tokens_total > 0
    assert s.preemption_recomputed_tokens_total <= 0.2 * r.preemption_recomputed_tokens_total
    # What /metrics shows is what happened.
    from prometheus_client.parser import text_string_to_metric_families

    from kvtier.engine.entrypoints.metrics import make_registry, render
    samples = {sm.name: sm.value for fam in text_string_to_metric_families(render(make_registry(swap.stats))[0].decode())
               for sm in fam.samples}
    assert samples["kvtier_preemption_swapped_in_blocks_total"] == s.preemption_swapped_in_blocks_total
    assert samples["kvtier_preemption_recomputed_tokens_total"] == s.preemption_recomputed_tokens_total
    assert samples["kvtier_preemption_restore_seconds_count"] == s.restore.count
    # Nothing is left pinned once every request ended.
    assert swap.connector.swap.num_pins == 0
    assert swap.connector.store.cpu.usage()["pinned"] == 0


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, default_model):
    return save_tiny("qwen2-hybrid", tmp_path_factory.mktemp("hybrid"), default_model.tokenizer, window=32)


def test_overloaded_hybrid_model_swap_and_recompute_equal_an_unconstrained_pool(hybrid):
    hf, loaded = hybrid
    prompts = random_prompts(12, 600, seed=3)
    max_tokens = 160
    reference = generate(engine(loaded), prompts, max_tokens)
    # 12 x ~800 tokens in both groups (the sliding one holds ~3 blocks) is ~2.5x these 240 blocks.
    swap, swapped, recompute, recomputed = overloaded(loaded, prompts, max_tokens, pool_blocks=240)
    check_overload(reference, swap, swapped, recompute, recomputed)
    for i in (0, 7):
        assert swapped[i] == hf_greedy(hf, prompts[i], max_tokens)


def test_overloaded_default_model_swap_and_recompute_equal_an_unconstrained_pool(default_model, hf_reference):
    tok = default_model.tokenizer
    prompts = [tok.encode(" ".join(f"Fact {s}-{i}: {i * s % 89} pears weigh {i + s} grams." for i in range(16)))
               for s in range(1, 9)]
    max_tokens = 96
    reference = generate(engine(default_model), prompts, max_tokens)
    # 8 x ~360 tokens is ~180 blocks of 16: 2.8x this pool.
    swap, swapped, recompute, recomputed = overloaded(default_model, prompts, max_tokens, pool_blocks=64)
    check_overload(reference, swap, swapped, recompute, recomputed)
    assert swapped[5] == hf_greedy(hf_reference, prompts[5], max_tokens)


def test_a_victim_whose_swapped_kv_found_no_room_recomputes_and_is_still_equal(hybrid):
    _, loaded = hybrid
    prompts = random_prompts(12, 600, seed=5)
    reference = generate(engine(loaded), prompts, 160)
    # A CPU tier of 8 offload blocks, 4 of them for swapping: most swaps are
    # declined or give way to newer ones.
    tiny = engine(loaded, kv_transfer_config=offloading(num_cpu_blocks=8),
                  num_gpu_blocks_override=240, max_num_batched_tokens=512)
    assert tiny.connector.swap.max_pins == 4
    assert generate(tiny, prompts, 160) == reference
    stats = tiny.stats()
    assert stats.num_preemptions_total > 0
    swap = tiny.connector.swap
    assert swap.num_declined + swap.num_dropped_for_room + stats.preemption_swap_fallbacks_total > 0
    assert stats.preemption_recomputed_tokens_total > 0
    assert swap.num_pins == 0


def test_aborting_a_swapped_out_request_frees_its_pins(hybrid):
    _, loaded = hybrid
    e = engine(loaded, kv_transfer_config=offloading(), num_gpu_blocks_override=240, max_num_batched_tokens=512)
    sp = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    for i, p in enumerate(random_prompts(12, 600, seed=9)):
        e.add_request(str(i), p, sp)
    victim = None
    for _ in range(2000):
        e.step()
        victim = next((r for r in e.scheduler.waiting if r.swapped_upto), None)
        if victim is not None:
            break
    assert victim is not None, "no request was swapped out"
    swap, cpu = e.connector.swap, e.connector.store.cpu
    # The step that preempted it flushed it too: its copy is in the CPU tier, pinned.
    assert swap.holds(victim.request_id) and cpu.usage()["pinned"] > 0
    pins = swap.num_pins
    e.abort_request(victim.request_id)
    assert not swap.holds(victim.request_id)
    assert swap.num_pins < pins
    assert cpu.usage()["pinned"] == swap.num_pins  # (the other victims' pins, one per kept block)
    for rid in list(e.requests):
        e.abort_request(rid)
    while e.has_unfinished_requests():
        e.step()
    assert swap.num_pins == 0 and cpu.usage()["pinned"] == 0


@pytest.mark.parametrize("tail_copied_first", [True, False], ids=["next-step", "same-step"])
def test_a_victim_that_must_give_up_its_kept_prefix_too_swaps_it_out_and_recomputes_nothing(hybrid,
                                                                                             tail_copied_first):
    """The victim kept its prefix on device and swapped its tail; then nothing
    runs and the head of the queue is short: the prefix joins the tail in one
    record, and the whole request loads back (it used to recompute). In the
    same step as the tail (nothing copied yet), the prefix's and the tail's
    pieces of one offload block were once kept under one key, and the victim
    came back with the tail's pages as its prefix (fuzz seed 30313)."""
    from kvtier.connectors.base import StepPlan
    from kvtier.engine.core.scheduler import SchedulerOutput
    _, loaded = hybrid
    prompts = random_prompts(2, 600, seed=11)
    reference = generate(engine(loaded), prompts[:1], 40)
    e = engine(loaded, kv_transfer_config=offloading(), num_gpu_blocks_override=240, max_num_batched_tokens=512)
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    e.add_request("victim", prompts[0], sp)
    while not e.requests["victim"].children[0].output_token_ids:
        e.step()
    s = e.scheduler
    victim = s.running[0]
    flush = lambda: e.connector.start_load_kv(e.connector.build_connector_meta(StepPlan([], set())))  # noqa: E731
    s._preempt(victim, 1)  # gives up its last block: the tail is swapped, the prefix stays
    if tail_copied_first:
        flush()
        s._preempted_now.clear()  # as the next step starts
    kept, upto = victim.num_computed_tokens, victim.swapped_upto
    assert 0 < kept < upto and s.kv_cache.block_ids("victim")[0][0] != 0
    e.add_request("head", prompts[1], sp)
    head = next(r for r in s.waiting if r.request_id == "head")
    assert not s._never_fits(head, SchedulerOutput())  # nothing runs: the holder gives its blocks up
    assert victim.num_computed_tokens == 0 and victim.swapped_upto == upto
    assert not any(b for table in s.kv_cache.block_ids("victim") for b in table)
    flush()
    e.abort_request("head")
    out = None
    while e.has_unfinished_requests():
        for o in e.step():
            out = o if o.request_id == "victim" else out
    assert out.outputs[0].token_ids == reference[0]
    stats = e.stats()
    assert stats.preemption_swap_fallbacks_total == 0
    assert stats.preemption_recomputed_tokens_total == 0
    assert e.connector.swap.num_pins == 0


def finish_order(e: LLMEngine, prompts, priorities, max_tokens: int, late: dict | None = None) -> list[str]:
    """Request ids in the order they finished; `late` = {step: (id, prompt, priority)} adds one mid-run."""
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, (p, prio) in enumerate(zip(prompts, priorities)):
        e.add_request(f"r{i}", p, sp, priority=prio)
    order, step = [], 0
    while e.has_unfinished_requests():
        if late and step in late:
            rid, p, prio = late[step]
            e.add_request(rid, p, sp, priority=prio)
        order += [o.request_id for o in e.step() if o.finished]
        step += 1
    return order


def test_priority_runs_higher_priority_requests_first_and_keeps_arrival_order_among_equals(hybrid):
    _, loaded = hybrid
    prompts = random_prompts(8, 300, seed=11)
    priorities = [1, 1, 0, 1, 0, 0, 1, 0]
    e = engine(loaded, kv_transfer_config=offloading(), scheduling_policy="priority",
               num_gpu_blocks_override=120, max_num_seqs=3, max_num_batched_tokens=512)
    order = finish_order(e, prompts, priorities, max_tokens=40)
    assert order == ["r2", "r4", "r5", "r7", "r0", "r1", "r3", "r6"]
    # fcfs ignores priority: arrival order.
    f = engine(loaded, num_gpu_blocks_override=120, max_num_seqs=3, max_num_batched_tokens=512)
    assert finish_order(f, prompts, priorities, max_tokens=40) == [f"r{i}" for i in range(8)]


def test_a_waiting_request_of_higher_priority_preempts_a_running_one(hybrid):
    _, loaded = hybrid
    prompts = random_prompts(4, 500, seed=13)
    e = engine(loaded, kv_transfer_config=offloading(), scheduling_policy="priority",
               num_gpu_blocks_override=150, max_num_batched_tokens=512)
    urgent = random_prompts(1, 520, seed=14)[0]
    order = finish_order(e, prompts, [5] * 4, max_tokens=120, late={30: ("urgent", urgent, 0)})
    assert order[0] == "urgent"
    assert e.stats().num_preemptions_total > 0
    # And the preempted requests' outputs are still right.
    ref = engine(loaded)
    want = generate(ref, prompts + [urgent], 120)
    sp = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    again = engine(loaded, kv_transfer_config=offloading(), scheduling_policy="priority",
                   num_gpu_blocks_override=150, max_num_batched_tokens=512)
    got = LLM.from_engine(again).generate(prompts + [urgent], sp, use_tqdm=False, priority=[5, 5, 5, 5, 0])
    assert [o.outputs[0].token_ids for o in got] == want


def test_the_request_policy_may_set_the_priority(hybrid, tmp_path):
    _, loaded = hybrid
    path = tmp_path / "urgent_policy.py"
    path.write_text("def on_new_request(info):\n"
                    "    return {'priority': 0 if info.num_tokens < 200 else 9}\n")
    e = engine(loaded, kv_transfer_config=offloading(request_policy_module_path=str(path)),
               scheduling_policy="priority", max_num_seqs=1)
    long, short = random_prompts(1, 400, seed=15)[0], random_prompts(1, 100, seed=16)[0]
    assert finish_order(e, [long, short], [0, 0], max_tokens=8) == ["r1", "r0"]


def test_swap_without_a_cpu_tier_is_a_start_up_error_naming_the_flag(hybrid):
    _, loaded = hybrid
    with pytest.raises(ConfigError, match="--preemption-mode") as err:
        LLMEngine(EngineConfig(preemption_mode="swap"), loaded=loaded)
    assert err.value.field == "preemption_mode"
    assert engine(loaded).preemption_mode == "recompute"


def test_priority_is_validated_at_the_edge():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lottery")
    with pytest.raises(ValidationError, match="preemption_mode"):
        EngineConfig(preemption_mode="spill")
    assert RequestStatus.PREEMPTED.value == "preempted"
