"""The KV cache manager: one coordinator over per-group managers."""
from __future__ import annotations

from dataclasses import dataclass

from kvtier.engine.core.kv_cache.block_pool import BlockPool, KVCacheBlock
from kvtier.engine.core.kv_cache.single_type_manager import SingleTypeManager, make_manager
from kvtier.engine.core.kv_cache.spec import KVCacheGroup


@dataclass
class PrefixHit:
    blocks: list[list[KVCacheBlock]]  # per group
    num_tokens: int

    @classmethod
    def empty(cls, num_groups: int) -> "PrefixHit":
        return cls([[] for _ in range(num_groups)], 0)


class KVCacheManager:
    def __init__(self, groups: list[KVCacheGroup], num_blocks: int, block_size: int, enable_caching: bool = True):
        self.groups = groups
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.managers: list[SingleTypeManager] = [make_manager(g, self.pool, block_size) for g in groups]
        self.num_queries = 0  # prefix-cache lookups, in tokens
        self.last_shortfall = 0  # free blocks the last allocate_slots that failed lacked
        self.num_hits = 0

    # -- lookups -----------------------------------------------------------
    def find_prefix_hit(self, block_hashes: list[bytes], num_prompt_tokens: int) -> PrefixHit:
        """Longest prefix every group accepts. At least one prompt token is always
        left to compute, since its logits are what the request needs next."""
        if not self.enable_caching:
            return PrefixHit.empty(len(self.groups))
        max_blocks = min(len(block_hashes), (num_prompt_tokens - 1) // self.block_size)
        hit = max_blocks
        # Groups disagree (a sliding group may need to back off past a gap that a
        # full group does not see); shrink until every group accepts the length.
        while True:
            new = hit
            for mgr in self.managers:
                new = min(new, mgr.longest_hit(block_hashes, new))
            if new == hit:
                break
            hit = new
        blocks = [mgr.hit_blocks(block_hashes, hit) for mgr in self.managers]
        return PrefixHit(blocks, hit * self.block_size)

    def record_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.num_queries += num_prompt_tokens
        self.num_hits += num_hit_tokens

    # -- allocation --------------------------------------------------------
    def allocate_slots(self, req_id: str, num_computed_tokens: int, num_new_tokens: int,
                       hit: PrefixHit | None = None, num_external_tokens: int = 0) -> bool:
        """Make room for `num_new_tokens` after `num_computed_tokens` (which
        include the device hit, if any) and `num_external_tokens` that a
        connector loads in between. False, with nothing allocated, when the
        pool is short."""
        computed = num_computed_tokens + num_external_tokens
        total = computed + num_new_tokens
        for mgr in self.managers:
            mgr.remove_skipped(req_id, computed)
        hit_blocks = hit.blocks if hit else [[] for _ in self.managers]
        need = sum(mgr.num_blocks_to_allocate(req_id, computed, total, blocks)
                   for mgr, blocks in zip(self.managers, hit_blocks))
        if need > self.pool.num_free_blocks:
            self.last_shortfall = need - self.pool.num_free_blocks
            return False
        for mgr, blocks in zip(self.managers, hit_blocks):
            mgr.take_hit(req_id, computed, blocks)
        for mgr in self.managers:
            mgr.allocate(req_id, total)
        return True

    # -- giving blocks back from the tail (preemption) ------------------------
    def truncation_point(self, req_id: str, num_blocks: int) -> int:
        """The largest block boundary (in tokens) such that giving up every block
        of the request from there on returns at least `num_blocks` blocks to the
        free pool (0: all of them, and maybe still short). Blocks shared with
        other requests return nothing and do not count."""
        tables = [mgr.req_blocks.get(req_id, []) for mgr in self.managers]
        freed = 0
        for i in range(max(map(len, tables), default=0) - 1, -1, -1):
            freed += sum(1 for t in tables if i < len(t) and not t[i].is_null and t[i].ref_cnt == 1)
            if freed >= num_blocks:
                return i * self.block_size
        return 0

    def truncate(self, req_id: str, num_tokens: int) -> None:
        """Give up the request's blocks from token `num_tokens` (a block boundary)
        on, in every group; those holding full blocks stay in the prefix cache."""
        assert num_tokens % self.block_size == 0, num_tokens
        for mgr in self.managers:
            mgr.truncate(req_id, num_tokens // self.block_size)

    def holds_blocks(self, req_id: str) -> bool:
        return any(mgr.req_blocks.get(req_id) for mgr in self.managers)

    def cache_blocks(self, req_id: str, block_hashes: list[bytes], num_computed_tokens: int,
                     token_ids: list[int] | None = None) -> None:
        """Publish full blocks of computed KV; `token_ids` (the request's) go into KV events."""
        if self.enable_caching:
            for mgr in self.managers:
                mgr.cache_full_blocks(req_id, block_hashes, num_computed_tokens, token_ids)

    def enable_events(self) -> None:
        self.pool.events = []

    def take_events(self) -> list:
        events = self.pool.events
        if not events:
            return []
        self.pool.events = []
        return events

    def free(self, req_id: str) -> None:
        for mgr in self.managers:
            mgr.free(req_id)

    # -- views -------------------------------------------------------------
    def block_ids(self, req_id: str) -> list[list[int]]:
        return [[b.block_id for b in mgr.req_blocks.get(req_id, ())] for mgr in self.managers]

    def max_blocks_needed(self, num_tokens: int, chunk: int) -> int:
        """The most blocks one request of `num_tokens` holds at once, computing at
        most `chunk` tokens a step: what admission checks against the pool."""
        return sum(mgr.max_blocks_needed(num_tokens, chunk) for mgr in self.managers)

    @property
    def usage(self) -> float:
        return self.pool.usage

    def usage_per_group(self) -> dict[str, float]:
        total = self.pool.num_blocks - 1
        out = {}
        for mgr in self.managers:
            held = {b.block_id for blocks in mgr.req_blocks.values() for b in blocks if not b.is_null}
            out[mgr.group.label] = len(held) / total
        return out
