"""Per-group block bookkeeping: one manager per KV cache group.

A full-attention group needs every block of a prefix; a sliding-window group
only the blocks that cover the last W-1 tokens before the next one, so it frees
blocks as they leave the window and can take a prefix hit whose early blocks are
long gone (they are represented by the null block).
"""
from __future__ import annotations

from engine.kv_cache.block_pool import BlockPool, KVCacheBlock
from engine.kv_cache.spec import KVCacheGroup, SlidingWindowSpec


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class SingleTypeManager:
    def __init__(self, group: KVCacheGroup, pool: BlockPool, block_size: int):
        self.group = group
        self.pool = pool
        self.block_size = block_size
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}

    # -- prefix hits -------------------------------------------------------
    def _cached(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.pool.get_cached((self.group.index, block_hash))

    def longest_hit(self, block_hashes: list[bytes], max_blocks: int) -> int:
        """Longest hit (in blocks, <= max_blocks) this group can serve."""
        n = 0
        while n < max_blocks and self._cached(block_hashes[n]) is not None:
            n += 1
        return n

    def hit_blocks(self, block_hashes: list[bytes], num_blocks: int) -> list[KVCacheBlock]:
        """The blocks of a hit of exactly `num_blocks` (which longest_hit accepted)."""
        return [self._cached(h) for h in block_hashes[:num_blocks]]

    # -- allocation --------------------------------------------------------
    def blocks(self, req_id: str) -> list[KVCacheBlock]:
        return self.req_blocks.setdefault(req_id, [])

    def num_new_blocks(self, req_id: str, num_tokens: int, num_hit_blocks: int) -> int:
        return max(0, cdiv(num_tokens, self.block_size) - len(self.blocks(req_id)) - num_hit_blocks)

    def add_hit(self, req_id: str, hit: list[KVCacheBlock]) -> None:
        self.pool.touch(hit)
        self.blocks(req_id).extend(hit)
        self.num_cached_blocks[req_id] = len(self.blocks(req_id))

    def allocate(self, req_id: str, num_tokens: int) -> None:
        n = self.num_new_blocks(req_id, num_tokens, 0)
        if n:
            self.blocks(req_id).extend(self.pool.allocate(n))

    def remove_skipped(self, req_id: str, num_computed_tokens: int) -> int:
        """Free blocks no future query can attend to; returns how many were freed."""
        return 0

    def cache_full_blocks(self, req_id: str, block_hashes: list[bytes], num_tokens: int) -> None:
        blocks = self.blocks(req_id)
        start = self.num_cached_blocks.get(req_id, 0)
        end = min(num_tokens // self.block_size, len(block_hashes), len(blocks))
        for i in range(start, end):
            self.pool.cache(blocks[i], (self.group.index, block_hashes[i]))
        self.num_cached_blocks[req_id] = max(start, end)

    def free(self, req_id: str) -> None:
        blocks = self.req_blocks.pop(req_id, [])
        self.num_cached_blocks.pop(req_id, None)
        self.pool.free(list(reversed(blocks)))


class FullAttentionManager(SingleTypeManager):
    pass


class SlidingWindowManager(SingleTypeManager):
    def __init__(self, group: KVCacheGroup, pool: BlockPool, block_size: int):
        super().__init__(group, pool, block_size)
        assert isinstance(group.spec, SlidingWindowSpec)
        self.spec: SlidingWindowSpec = group.spec

    def _first_needed_block(self, num_tokens: int) -> int:
        return self.spec.needed_from(num_tokens) // self.block_size

    def longest_hit(self, block_hashes: list[bytes], max_blocks: int) -> int:
        # A hit of k blocks needs blocks first_needed(k*bs) .. k-1 resident.
        # Keep the length of the run of cached blocks ending at each index and
        # remember the last index where the run is long enough.
        best, run = 0, 0
        for i in range(max_blocks):
            run = run + 1 if self._cached(block_hashes[i]) is not None else 0
            k = i + 1
            if run >= k - self._first_needed_block(k * self.block_size):
                best = k
        return best

    def hit_blocks(self, block_hashes: list[bytes], num_blocks: int) -> list[KVCacheBlock]:
        first = self._first_needed_block(num_blocks * self.block_size)
        null = [self.pool.null_block] * first
        return null + [self._cached(h) for h in block_hashes[first:num_blocks]]

    def remove_skipped(self, req_id: str, num_computed_tokens: int) -> int:
        blocks = self.blocks(req_id)
        first = min(self._first_needed_block(num_computed_tokens), len(blocks))
        freed = []
        for i in range(first - 1, -1, -1):
            if blocks[i].is_null:
                break  # everything before was released on an earlier step
            freed.append(blocks[i])
            blocks[i] = self.pool.null_block
        self.pool.free(freed)
        return len(freed)


def make_manager(group: KVCacheGroup, pool: BlockPool, block_size: int) -> SingleTypeManager:
    if isinstance(group.spec, SlidingWindowSpec):
        return SlidingWindowManager(group, pool, block_size)
    return FullAttentionManager(group, pool, block_size)
