"""Per-group block bookkeeping: one manager per KV cache group.

A full-attention group needs every block of a prefix; a sliding-window group
only the blocks that cover the last W-1 tokens before the next query, so it
frees blocks as they leave the window, and a request admitted with a hit
(from the device cache or a tier) holds the null block at every position
before the window it needs: never a page that nothing wrote.

`skipped_blocks` is the one rule for which leading blocks a group does not
hold; admission, the cold path and the hit path all count blocks with it.
"""
from __future__ import annotations

from kvtier.connectors import kv_events
from kvtier.engine.core.kv_cache.block_pool import BlockPool, KVCacheBlock
from kvtier.engine.core.kv_cache.spec import KVCacheGroup, SlidingWindowSpec


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class SingleTypeManager:
    def __init__(self, group: KVCacheGroup, pool: BlockPool, block_size: int):
        self.group = group
        self.pool = pool
        self.block_size = block_size
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}

    # -- the one counting rule ----------------------------------------------
    def skipped_blocks(self, num_computed_tokens: int) -> int:
        """Leading blocks no query at or after `num_computed_tokens` attends to."""
        return 0

    def blocks_needed(self, num_computed_tokens: int, num_tokens: int) -> int:
        """Real blocks a request holds while computing up to `num_tokens` from
        `num_computed_tokens` on."""
        return max(0, cdiv(num_tokens, self.block_size) - self.skipped_blocks(num_computed_tokens))

    def max_blocks_needed(self, num_tokens: int, chunk: int) -> int:
        """The most real blocks a request of `num_tokens` holds at once, computing
        at most `chunk` tokens a step."""
        return self.blocks_needed(0, num_tokens)

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
        """The blocks of a hit of exactly `num_blocks` (which longest_hit accepted);
        the null block where the group needs nothing."""
        first = self.skipped_blocks(num_blocks * self.block_size)
        return [self.pool.null_block] * first + [self._cached(h) for h in block_hashes[first:num_blocks]]

    # -- allocation --------------------------------------------------------
    def blocks(self, req_id: str) -> list[KVCacheBlock]:
        return self.req_blocks.setdefault(req_id, [])

    def num_blocks_to_allocate(self, req_id: str, num_computed_tokens: int, num_tokens: int,
                               hit: list[KVCacheBlock]) -> int:
        """Free blocks that allocate() would take: new blocks, plus hit blocks that
        sit in the free queue (taking one of those costs a free block too)."""
        held = self.req_blocks.get(req_id)
        if held:  # (positions before the window that a short table lacks take the null block)
            return max(0, cdiv(num_tokens, self.block_size) - max(len(held), self.skipped_blocks(num_computed_tokens)))
        skipped = self.skipped_blocks(num_computed_tokens)
        kept_hit = hit[skipped:]
        reused = sum(1 for b in kept_hit if b.ref_cnt == 0 and not b.is_null)
        return reused + max(0, cdiv(num_tokens, self.block_size) - max(skipped, len(hit)))

    def take_hit(self, req_id: str, num_computed_tokens: int, hit: list[KVCacheBlock]) -> None:
        """A new request takes the null block for every skipped position, then
        the hit blocks past them. Every group takes its hit before any group
        allocates: a hit block waiting in the free queue must not be handed out
        as another group's new block first."""
        blocks = self.blocks(req_id)
        skipped = self.skipped_blocks(num_computed_tokens)
        if blocks:
            # A request holding a prefix (a swapped victim keeps one) that resumes
            # past its window: the positions between take the null block.
            blocks.extend([self.pool.null_block] * max(0, skipped - len(blocks)))
            return
        kept_hit = hit[skipped:]
        self.pool.touch(kept_hit)
        blocks.extend([self.pool.null_block] * skipped)
        blocks.extend(kept_hit)
        self.num_cached_blocks[req_id] = len(blocks)

    def allocate(self, req_id: str, num_tokens: int) -> None:
        """New blocks up to `num_tokens` (num_blocks_to_allocate said the pool has room)."""
        blocks = self.blocks(req_id)
        n = cdiv(num_tokens, self.block_size) - len(blocks)
        if n > 0:
            blocks.extend(self.pool.allocate(n))

    def remove_skipped(self, req_id: str, num_computed_tokens: int) -> int:
        """Free blocks no future query can attend to; returns how many were freed."""
        return 0

    def cache_full_blocks(self, req_id: str, block_hashes: list[bytes], num_tokens: int,
                          token_ids: list[int] | None = None) -> None:
        """Publish the request's blocks that hold `num_tokens` of computed (or loaded) KV."""
        blocks = self.blocks(req_id)
        start = self.num_cached_blocks.get(req_id, 0)
        end = min(num_tokens // self.block_size, len(block_hashes), len(blocks))
        run: list[int] = []  # blocks published now, in a row: one event
        for i in range(start, end):
            # A null block is a position this group never held.
            fresh = not blocks[i].is_null and self.pool.cache(blocks[i], (self.group.index, block_hashes[i]))
            if fresh and (not run or run[-1] == i - 1):
                run.append(i)
                continue
            self._stored_event(run, block_hashes, token_ids)
            run = [i] if fresh else []
        self._stored_event(run, block_hashes, token_ids)
        self.num_cached_blocks[req_id] = max(start, end)

    def _stored_event(self, run: list[int], block_hashes: list[bytes], token_ids: list[int] | None) -> None:
        if not run or self.pool.events is None or token_ids is None:
            return
        bs = self.block_size
        self.pool.events.append(kv_events.stored(
            [block_hashes[i] for i in run], block_hashes[run[0] - 1] if run[0] else None,
            token_ids[run[0] * bs:(run[-1] + 1) * bs], bs, kv_events.DEVICE, self.group.index,
            getattr(self.group.spec, "window", None)))

    def truncate(self, req_id: str, num_blocks: int) -> None:
        """Keep the first `num_blocks` of the request's table, free the rest (tail first)."""
        blocks = self.req_blocks.get(req_id)
        if not blocks or len(blocks) <= num_blocks:
            return
        tail = blocks[num_blocks:]
        del blocks[num_blocks:]
        self.num_cached_blocks[req_id] = min(self.num_cached_blocks.get(req_id, 0), num_blocks)
        self.pool.free(list(reversed(tail)))

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

    def skipped_blocks(self, num_computed_tokens: int) -> int:
        return self.spec.needed_from(num_computed_tokens) // self.block_size

    def max_blocks_needed(self, num_tokens: int, chunk: int) -> int:
        # The count peaks while a chunk is computed at some c; past c = W - 1 it
        # repeats with period block_size (both ends move one block per block),
        # and before that it only grows with c. So those c are all to look at.
        last = max(0, num_tokens - 1)
        first = max(0, self.spec.window - 2)
        candidates = {0, last, min(first, last), *range(first, first + self.block_size + 2)}
        return max(self.blocks_needed(c, min(c + chunk, num_tokens)) for c in candidates if c <= last)

    def longest_hit(self, block_hashes: list[bytes], max_blocks: int) -> int:
        # A hit of k blocks needs blocks skipped(k*bs) .. k-1 resident. Keep the
        # length of the run of cached blocks ending at each index and remember
        # the last index where the run is long enough.
        best, run = 0, 0
        for i in range(max_blocks):
            run = run + 1 if self._cached(block_hashes[i]) is not None else 0
            k = i + 1
            if run >= k - self.skipped_blocks(k * self.block_size):
                best = k
        return best

    def remove_skipped(self, req_id: str, num_computed_tokens: int) -> int:
        blocks = self.blocks(req_id)
        first = min(self.skipped_blocks(num_computed_tokens), len(blocks))
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
