"""The CPU tier's pool: preallocated, pinned while in use, batched copies."""
from __future__ import annotations

import torch

from kvtier.kvstore.tiers import CpuTier
from kvtier.policies import LRUPolicy

from kv_helpers import SHAPE, bit_equal, block_keys, random_blocks

BLOCK_BYTES = torch.Size(SHAPE).numel() * 4


def _tier(blocks: int) -> CpuTier:
    return CpuTier("cpu", SHAPE, torch.float32, blocks * BLOCK_BYTES + BLOCK_BYTES // 2, LRUPolicy())


def test_the_pool_is_one_tensor_allocated_once():
    tier = _tier(4)
    pool, address = tier.pool, tier.pool.data_ptr()
    assert tuple(pool.shape) == (4, *SHAPE)
    for _ in range(3):
        tier.put(block_keys(4), random_blocks(4))
    assert tier.pool is pool and tier.pool.data_ptr() == address


def test_a_batch_lands_in_consecutive_slots():
    tier = _tier(6)
    keys, blocks = block_keys(4), random_blocks(4)
    tier.put(keys, blocks)
    assert bit_equal(tier.pool[:4], blocks)


def test_an_acquired_block_is_never_evicted_until_released():
    tier = _tier(2)
    keys, blocks = block_keys(4), random_blocks(4)
    tier.put(keys[:2], blocks[:2])
    views = tier.acquire(keys[:1])

    tier.put(keys[2:4], blocks[2:4])  # room for one: key 1 goes, key 0 stays

    assert tier.exists(keys[:1]) == 1 and tier.exists(keys[1:2]) == 0
    assert bit_equal(views[0], blocks[0])
    assert tier.stats.dropped == 1
    tier.release(keys[:1])
    tier.put(keys[3:4], blocks[3:4])
    assert tier.exists(keys[:1]) == 0


def test_deleting_an_acquired_block_frees_its_slot_only_on_release():
    tier = _tier(1)
    keys, blocks = block_keys(2), random_blocks(2)
    tier.put(keys[:1], blocks[:1])
    view = tier.acquire(keys[:1])[0]

    tier.delete(keys[:1])
    assert tier.exists(keys[:1]) == 0
    assert tier.put(keys[1:], blocks[1:]) == 0  # the slot is still being read
    assert bit_equal(view, blocks[0])

    tier.release(keys[:1])
    assert tier.put(keys[1:], blocks[1:]) == 1


def test_evicted_blocks_are_handed_to_on_evict_intact():
    tier = _tier(2)
    handed = {}
    tier.on_evict = lambda keys, blocks: handed.update(zip(keys, [b.clone() for b in blocks]))
    keys, blocks = block_keys(4), random_blocks(4)
    for i in range(4):
        tier.put(keys[i:i + 1], blocks[i:i + 1])
    assert list(handed) == keys[:2]
    assert bit_equal(handed[keys[0]], blocks[0]) and bit_equal(handed[keys[1]], blocks[1])
    assert tier.stats.evictions == 2


def test_a_store_failing_half_way_gives_every_slot_back():
    tier = _tier(3)
    tier.put(block_keys(3), random_blocks(3))

    def hand_down_fails(keys, blocks):
        raise OSError("the tier below is gone")

    tier.on_evict = hand_down_fails
    assert tier.put(block_keys(2), random_blocks(2)) == 0  # a failure is a dropped store, never an exception

    usage = tier.usage()
    assert usage["blocks"] + usage["free_slots"] == 3 and usage["pinned"] == 0
    tier.on_evict = None
    tier.health.succeeded()  # skip the back-off the failure started
    assert tier.put(block_keys(3), random_blocks(3)) == 3
    assert tier.usage()["blocks"] == 3 and tier.usage()["free_slots"] == 0


def test_a_reserved_slot_is_nobodys_until_settled_and_an_unfilled_one_goes_back():
    """reserve/settle: how a lower-tier hit is read straight into the CPU tier."""
    tier = _tier(4)
    keys, blocks = block_keys(3), random_blocks(3)
    tier.put(keys[:1], blocks[:1])
    slots = tier.reserve(keys)
    assert slots[0] is None and None not in slots[1:]  # held already: no slot
    assert tier.contains(keys) == [True, False, False]  # being filled is not held
    assert tier.reserve(keys[1:]) == [None, None]  # nobody else is given them
    for slot, block in zip(slots[1:], blocks[1:]):
        tier.pool[slot].copy_(block)

    tier.settle(keys, slots, [True, True, False])  # key 2 arrived short: not kept

    assert tier.contains(keys) == [True, True, False]
    assert tier.usage()["pinned"] == 1 and tier.usage()["free_slots"] == 2
    tier.release(keys[1:2])
    out = torch.zeros_like(blocks)
    assert tier.get(keys[:2], out[:2]) and bit_equal(out[:2], blocks[:2])
    assert tier.usage()["pinned"] == 0
