"""The fuzz's content witness (kv_invariants.ContentWitness) finds a wrong
page even where the greedy output does not change, and stays quiet on a
correct tier hit."""
from __future__ import annotations

import pytest
from test_reuse_safety import GREEDY, hybrid, make_llm, offloading, random_prompt  # noqa: F401 (fixture)

from kv_invariants import ContentTruth, ContentWitness


def _serve_from_the_tier(llm, prompt) -> None:
    llm.generate([prompt], GREEDY, use_tqdm=False)
    for seed in (3, 4, 5):  # push it out of the device pool
        llm.generate([random_prompt(500, seed)], GREEDY, use_tqdm=False)
    assert llm.engine.connector.store.flush(60)
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 512  # it came from the tier


@pytest.mark.parametrize("damage", [None, "nudge", "wrong_row"])
def test_the_content_witness_names_a_loaded_page_that_differs_from_its_computed_kv(hybrid, damage):  # noqa: F811
    _, loaded = hybrid
    llm = make_llm(loaded, offloading(), num_gpu_blocks_override=120, max_num_batched_tokens=256)
    copier = llm.engine.connector._copier
    scatter = copier.scatter
    if damage == "nudge":  # a little off: no greedy token needs to change
        copier.scatter = lambda ids, pages, rows: scatter(ids, pages + 0.05, rows)
    elif damage == "wrong_row":  # another row's page: a swapped index
        copier.scatter = lambda ids, pages, rows: scatter(ids, pages, rows[1:] + rows[:1])
    witness = ContentWitness(llm.engine, ContentTruth(llm.engine.runner.kv_cache.dtype))
    _serve_from_the_tier(llm, random_prompt(600, 1))
    if damage is None:
        assert witness.violations == []
    else:
        assert witness.violations and "differs from its computed KV" in witness.violations[0]
