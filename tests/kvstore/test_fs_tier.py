"""The fs tier: persistence across processes, capacity, atomic writes."""
from __future__ import annotations

import os

import torch

from kv_helpers import bit_equal, block_keys, random_blocks


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_a_new_instance_hits_on_blocks_written_before(make_tier, spec_for):
    spec = spec_for("fs")
    first = make_tier(spec)
    keys, blocks = block_keys(4), random_blocks(4)
    first.put(keys, blocks)
    usage_before = first.usage()
    first.close()

    second = make_tier(spec)  # as after a restart: nothing in memory
    out = torch.zeros_like(blocks)

    assert second.exists(keys) == 4
    assert all(block is not None for block in second.get(keys, out))
    assert bit_equal(out, blocks)
    assert second.usage()["used_bytes"] == usage_before["used_bytes"]
    assert second.usage()["blocks"] == 4


def test_capacity_evicts_least_recently_used_files(make_tier, spec_for):
    one_block = make_tier("fs").codec.encoded_size(block_keys(1)[0])
    tier = make_tier(spec_for("fs", max_bytes=3 * one_block))
    keys, blocks = block_keys(5), random_blocks(5)
    tier.put(keys[:3], blocks[:3])
    tier.get(keys[:1])  # key 0 is now the most recent

    tier.put(keys[3:4], blocks[3:4])  # evicts key 1
    tier.put(keys[4:5], blocks[4:5])  # evicts key 2

    held = [tier.exists([key]) for key in keys]
    assert held == [1, 0, 0, 1, 1]
    assert tier.usage()["used_bytes"] <= 3 * one_block
    assert len([f for f in _files(tier.backend.root) if f.endswith(".kvb")]) == 3
    assert tier.stats.evictions == 2


def test_a_restart_with_a_smaller_capacity_evicts_the_oldest(make_tier, spec_for):
    spec = spec_for("fs")
    keys, blocks = block_keys(4), random_blocks(4)
    first = make_tier(spec)
    for i in range(4):  # distinct modification times, oldest first
        first.put(keys[i:i + 1], blocks[i:i + 1])
        path = first.backend._path(keys[i])
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    first.close()

    second = make_tier({**spec, "max_bytes": 2 * first.codec.encoded_size(keys[0])})

    assert [second.exists([key]) for key in keys] == [0, 0, 1, 1]


def test_writes_leave_no_temp_files(make_tier):
    tier = make_tier("fs")
    keys, blocks = block_keys(8), random_blocks(8)
    tier.put(keys, blocks)
    assert all(not f.split("/")[-1].startswith(".") for f in _files(tier.backend.root))
    assert len(_files(tier.backend.root)) == 8


def test_a_store_failing_half_way_loses_and_leaks_nothing(make_tier, spec_for):
    one_block = make_tier("fs").codec.encoded_size(block_keys(1)[0])
    tier = make_tier(spec_for("fs", max_bytes=10 * one_block))
    keys, blocks = block_keys(4), random_blocks(4)
    os.makedirs(tier.backend._path(keys[2]))  # a directory where block 2 must go: its rename fails

    assert tier.put(keys, blocks) == 3

    assert tier.stats.errors == 1 and tier.stats.dropped == 1
    assert tier.usage()["blocks"] == 3
    assert tier.usage()["used_bytes"] == 3 * one_block  # the failed block's room came back
    assert tier.usage()["pinned"] == 0
    assert tier.healthy  # one bad path is not a sick tier
    out = torch.zeros_like(blocks)
    got = tier.get(keys, out)
    assert [block is not None for block in got] == [True, True, False, True]
    assert bit_equal(out[3], blocks[3])
    assert not any(".tmp" in f for f in _files(tier.backend.root))
