"""Allocator unit tests: block pool, per-group managers, the hybrid hit search."""
import pytest

from kvtier.engine.core.kv_cache import BlockPool, KVCacheManager, build_kv_cache_groups
from kvtier.engine.core.kv_cache.block_hash import extend_block_hashes, hash_block
from kvtier.engine.core.kv_cache.spec import FullAttentionSpec, SlidingWindowSpec

BS = 4


def hashes_for(tokens, salt=None):
    out = []
    extend_block_hashes(out, tokens, BS, salt)
    return out


def test_block_hash_is_stable_chained_and_salted():
    a = hashes_for(list(range(12)))
    assert a == hashes_for(list(range(12)))  # deterministic, no Python hash()
    assert len(a) == 3 and len(set(a)) == 3
    b = hashes_for([99] + list(range(1, 12)))
    assert all(x != y for x, y in zip(a, b))  # a change in block 0 changes every later hash
    assert hashes_for(list(range(12)), "tenant-a") != a
    assert hashes_for(list(range(12)), "tenant-a")[2] != hashes_for(list(range(12)), "tenant-b")[2]
    assert hash_block(b"\0" * 32, [1, 2]) != hash_block(b"\0" * 32, [2, 1])


def test_groups_split_layers_evenly_full_first():
    types = ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"] * 2
    groups = build_kv_cache_groups(types, 8)
    assert [type(g.spec) for g in groups] == [FullAttentionSpec, SlidingWindowSpec, SlidingWindowSpec]
    assert groups[0].layers == (1, 3)
    assert sorted(l for g in groups for l in g.layers) == list(range(6))
    assert {len(g.layers) for g in groups} == {2}
    # No window declared: every layer is full attention, one group.
    assert len(build_kv_cache_groups(types, None)) == 1


def test_pool_lru_eviction_order_and_refcounts():
    pool = BlockPool(5)
    a, b, c = pool.allocate(3)
    for i, blk in enumerate((a, b, c)):
        pool.cache(blk, (0, bytes([i])))
    pool.free([c, b, a])  # tail first: c is the first to be reused
    assert [x.ref_cnt for x in (a, b, c)] == [0, 0, 0]
    first = pool.allocate(1)[0]
    assert first.block_id == 4  # never-used blocks sit ahead of freed ones
    nxt = pool.allocate(1)[0]
    assert nxt is c and pool.get_cached((0, bytes([2]))) is None  # LRU, and its hash is gone
    assert pool.get_cached((0, bytes([0]))) is a
    pool.touch([a])  # a prefix hit takes it back out of the free queue
    assert a.ref_cnt == 1 and pool.num_free_blocks == 1
    with pytest.raises(AssertionError):
        pool.free([first]); pool.free([first])


def full_manager(num_blocks=16):
    return KVCacheManager(build_kv_cache_groups(["full_attention"] * 2, None), num_blocks, BS)


def test_prefix_hit_leaves_one_token_to_compute():
    kv = full_manager()
    toks = list(range(16))
    h = hashes_for(toks)
    assert kv.allocate_slots("a", 0, 16)
    kv.cache_blocks("a", h, 16)
    kv.free("a")
    hit = kv.find_prefix_hit(h, 16)
    assert hit.num_tokens == 12  # the last block is recomputed so its logits exist
    assert kv.find_prefix_hit(h, 17).num_tokens == 16
    other = hashes_for([7] + toks[1:])
    assert kv.find_prefix_hit(other, 16).num_tokens == 0


def test_allocation_fails_cleanly_when_short():
    kv = full_manager(num_blocks=5)  # 4 usable
    assert kv.allocate_slots("a", 0, 12)
    free_before = kv.pool.num_free_blocks
    assert not kv.allocate_slots("b", 0, 8)
    assert kv.pool.num_free_blocks == free_before and kv.block_ids("b") == [[]]
    kv.free("a")
    assert kv.pool.num_free_blocks == 4


def hybrid_manager(window=8, num_blocks=64):
    return KVCacheManager(build_kv_cache_groups(["full_attention", "sliding_attention"], window), num_blocks, BS)


def test_sliding_window_frees_out_of_window_blocks_at_the_right_step():
    kv = hybrid_manager(window=8)
    full, sliding = kv.managers
    assert kv.allocate_slots("r", 0, 20)  # a 20-token prefill: 5 blocks in each group
    assert len([b for b in sliding.blocks("r") if not b.is_null]) == 5
    free0 = kv.pool.num_free_blocks
    # Next query at position 20 sees keys 13..20: blocks 0..2 (tokens 0..11) are out.
    assert kv.allocate_slots("r", 20, 1)
    ids = kv.block_ids("r")
    assert ids[1][:3] == [0, 0, 0] and 0 not in ids[1][3:]
    assert all(i != 0 for i in ids[0])  # full attention keeps everything
    assert kv.pool.num_free_blocks == free0 + 3 - 2  # three back, a new block per group for token 20
    # Position 23: keys 16..23, block 3 (12..15) goes.
    assert kv.allocate_slots("r", 23, 1)
    assert kv.block_ids("r")[1][3] == 0
    kv.free("r")
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks[1:])


def test_hybrid_hit_is_the_minimum_the_groups_accept():
    kv = hybrid_manager(window=8)
    toks = list(range(32))
    h = hashes_for(toks)
    assert kv.allocate_slots("a", 0, 32)
    kv.cache_blocks("a", h, 32)
    kv.free("a")
    assert kv.find_prefix_hit(h, 33).num_tokens == 32
    # Evict the sliding group's block 5 (tokens 20..23) only.
    sliding_block = kv.pool.get_cached((1, h[5]))
    kv.pool.touch([sliding_block]); kv.pool._drop_hash(sliding_block); kv.pool.free([sliding_block])
    # A hit of 32 needs sliding blocks 6,7; 28 needs 5,6 (gone); 24 needs 4,5 (gone);
    # so sliding accepts 32, and the full group accepts 32 too.
    assert kv.find_prefix_hit(h, 33).num_tokens == 32
    # Evict full block 6: the full group only accepts 24, where the sliding group needs block 5: gone.
    # 20 needs sliding blocks 3,4: present. So the hit is 20.
    full_block = kv.pool.get_cached((0, h[6]))
    kv.pool.touch([full_block]); kv.pool._drop_hash(full_block); kv.pool.free([full_block])
    hit = kv.find_prefix_hit(h, 33)
    assert hit.num_tokens == 20
    assert [b.is_null for b in hit.blocks[1]] == [True, True, True, False, False]
    assert len(hit.blocks[0]) == 5 and not any(b.is_null for b in hit.blocks[0])
    assert kv.allocate_slots("b", 20, 13, hit)
    kv.free("b")
    assert all(b.ref_cnt >= 0 for b in kv.pool.blocks)


def test_a_running_request_blocks_are_never_handed_out():
    kv = full_manager(num_blocks=5)
    assert kv.allocate_slots("a", 0, 16)
    held = set(kv.block_ids("a")[0])
    assert not kv.allocate_slots("b", 0, 4)  # 4 usable, all held by a
    kv.free("a")
    assert kv.allocate_slots("b", 0, 16)
    assert set(kv.block_ids("b")[0]) == held


def test_every_group_takes_its_hit_before_any_group_allocates():
    """A hit block of one group, waiting at the head of the free queue, must not
    be handed out as another group's new block first (the same page would then
    sit in two tables)."""
    kv = hybrid_manager(window=8, num_blocks=9)  # 8 usable
    toks = list(range(12))
    h = hashes_for(toks)
    assert kv.allocate_slots("a", 0, 12)  # 3 blocks per group: 1-3 full, 4-6 sliding
    assert kv.allocate_slots("x", 0, 4)  # the other two
    kv.cache_blocks("a", h, 12)
    kv.free("a")
    kv.free("x")  # the queue: 3 2 1 6 5 4 7 8
    hit = kv.find_prefix_hit(h, 13)
    assert hit.num_tokens == 12
    assert kv.allocate_slots("b", 12, 4, hit)
    tables = kv.block_ids("b")
    real = [b for table in tables for b in table if b != 0]
    assert len(real) == len(set(real)), tables
    assert all(b.ref_cnt <= 1 for b in kv.pool.blocks[1:] if b.block_id in real)


def test_truncating_from_the_tail_frees_only_what_the_step_needs_and_resumes_past_the_window():
    groups = build_kv_cache_groups(["full_attention", "sliding_attention"], 8)
    m = KVCacheManager(groups, 40, BS)
    assert m.allocate_slots("a", 0, 24)
    m.allocate_slots("a", 24, 0)  # computed 24: the sliding group lets the blocks before its window (17..) go
    full, sliding = m.block_ids("a")
    assert len(full) == 6 and sliding[:4] == [0] * 4 and 0 not in sliding[4:]
    free = m.pool.num_free_blocks
    # Two blocks wanted: the tail position (one real block in each group) is enough.
    assert m.truncation_point("a", 2) == 20
    m.truncate("a", 20)
    assert m.pool.num_free_blocks == free + 2
    assert [len(t) for t in m.block_ids("a")] == [5, 5]
    # Resuming far past its window (a swapped victim loading back up to 60):
    # the sliding group holds the null block between its kept prefix and the window.
    m.truncate("a", 8)
    assert m.allocate_slots("a", 8, 0, None, 52)
    full, sliding = m.block_ids("a")
    assert len(full) == 15 and len(sliding) == 15
    assert sliding[:13] == [0] * 13 and 0 not in sliding[13:]  # window at 60: tokens 53.., blocks 13-14


def test_a_block_shared_with_another_request_frees_nothing_when_truncated():
    m = KVCacheManager(build_kv_cache_groups(["full_attention"], None), 10, BS)
    hashes = hashes_for(list(range(8)))
    assert m.allocate_slots("a", 0, 8)
    m.cache_blocks("a", hashes, 8)
    hit = m.find_prefix_hit(hashes, 8)  # one block: the last prompt token is always computed
    assert hit.num_tokens == 4 and m.allocate_slots("b", 4, 4, hit)
    assert m.truncation_point("a", 1) == 4  # its own tail block
    assert m.truncation_point("a", 2) == 0  # block 0 is b's too: still one short
