"""A witness of every write into an engine's device pool, checking as it goes:

- new KV is written only into blocks the writing request holds alone, never
  into the null block, a shared block or one in the prefix cache;
- a block is published in the prefix cache only once every slot of it was
  written since it was last handed out (computed, or loaded from a tier);
- a tier load copies only into blocks of a request that is still loading;
- a step reads only KV that was written: every position a new token attends
  to (its window, for a sliding group) lies in a block slot written since the
  block was handed out.

It wraps the engine's own objects (pool, runner, connector copier); nothing
of the engine changes. Violations are collected in `violations`.
"""
from __future__ import annotations


class PageWitness:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.violations: list[str] = []
        self.block_size = engine.block_size
        self._slots: dict[int, set[int]] = {}  # block id -> slots written since it was handed out
        self._wrap_pool(engine.kv_cache_manager.pool)
        self._wrap_runner(engine.runner)
        connector = engine.connector
        for c in getattr(connector, "connectors", [connector]):
            if c is not None and hasattr(c, "_copier"):
                self._wrap_copier(c._copier)

    def _note(self, message: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(message)

    def _wrap_pool(self, pool) -> None:
        allocate, cache = pool.allocate, pool.cache

        def allocate_wrapped(n):
            blocks = allocate(n)
            for b in blocks:
                self._slots[b.block_id] = set()
            return blocks

        def cache_wrapped(block, key):
            if pool.enable_caching and not block.is_null and block.key is None and key not in pool._cached:
                written = self._slots.get(block.block_id, set())
                if len(written) < self.block_size:
                    self._note(f"block {block.block_id} cached as {key[0]}/{key[1].hex()[:8]} with only "
                               f"{len(written)} of {self.block_size} slots written")
            return cache(block, key)

        pool.allocate, pool.cache = allocate_wrapped, cache_wrapped

    def _wrap_runner(self, runner) -> None:
        execute = runner.execute
        kv = self.engine.kv_cache_manager
        bs = self.block_size

        specs = [g.spec for g in self.engine.groups]

        def execute_wrapped(sched):
            for s in sched.scheduled:
                r = s.request
                for g, table in enumerate(kv.block_ids(r.request_id)):
                    self._check_reads(r.request_id, g, table, specs[g].needed_from(r.num_computed_tokens),
                                      r.num_computed_tokens)
                    for p in range(r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens):
                        block_id = table[p // bs]
                        block = kv.pool.blocks[block_id]
                        if block.is_null or block.ref_cnt != 1 or block.key is not None:
                            holders = sorted(rid for mgr in kv.managers for rid, blocks in mgr.req_blocks.items()
                                             if block in blocks)
                            self._note(f"{r.request_id} writes position {p} of group {g} into block {block_id} "
                                       f"(null={block.is_null}, refs={block.ref_cnt}, cached={block.key is not None}, "
                                       f"held by {holders})")
                            break
                        self._slots.setdefault(block_id, set()).add(p % bs)
            return execute(sched)

        runner.execute = execute_wrapped

    def _check_reads(self, rid: str, group: int, table: list[int], start: int, end: int) -> None:
        """Positions start..end-1 (computed before this step) must have been written."""
        bs = self.block_size
        for i in range(start // bs, -(-end // bs)):
            lo, hi = max(start, i * bs) - i * bs, min(end, (i + 1) * bs) - i * bs
            written = self._slots.get(table[i], set()) if i < len(table) else set()
            if i >= len(table) or table[i] == 0 or not all(slot in written for slot in range(lo, hi)):
                self._note(f"{rid} reads positions {i * bs + lo}..{i * bs + hi - 1} of group {group} "
                           f"from block {table[i] if i < len(table) else None}, not all written")
                return

    def _wrap_copier(self, copier) -> None:
        scatter = copier.scatter
        scheduler = self.engine.scheduler
        kv = self.engine.kv_cache_manager

        def scatter_wrapped(block_ids, pages, rows):
            owned = {b for rid in scheduler.loading.copy() for table in kv.block_ids(rid) for b in table}
            for b in block_ids:
                if b not in owned or b == 0:
                    self._note(f"a load copies into block {b}, which no loading request holds")
                self._slots[b] = set(range(self.block_size))
            return scatter(block_ids, pages, rows)

        copier.scatter = scatter_wrapped
