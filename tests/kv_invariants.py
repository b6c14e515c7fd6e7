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


class ContentTruth:
    """The KV of every (group, position) an engine computed, named by the
    tokens up to it (a hash chain that starts at the cache salt), kept across
    engines of one model and dtype (a restart, a replica)."""

    def __init__(self, kv_dtype) -> None:
        import torch
        self.rows: dict[tuple[int, int], int] = {}
        self.data: list = []
        self.from_load: set[int] = set()  # rows first seen in a loaded page, not computed here
        # A different chunking moves float32 KV by ulps; a 16-bit cache rounds that to one 16-bit ulp.
        self.tol = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}[kv_dtype]


class ContentWitness:
    """Checks what a step reads against what was computed for the same tokens:
    every slot a step attends to that the forward pass did not write into its
    block since the block was handed out (a load, a swap-in) must hold the KV
    the engine computed for that (group, tokens). A loaded page with no
    computed counterpart yet becomes the truth, checked when it is computed.
    Finds a wrong page even when the greedy output happens not to change."""

    def __init__(self, engine, truth: ContentTruth) -> None:
        self.engine = engine
        self.truth = truth
        self.violations: list[str] = []
        self.block_size = engine.block_size
        self.kv = engine.runner.kv_cache
        self.num_layers = [len(g.layers) for g in engine.groups]
        self.specs = [g.spec for g in engine.groups]
        self._verified: dict[int, set[int]] = {}  # block -> slots computed or checked since handed out
        self._chains: dict[str, list[int]] = {}
        self._wrap(engine.kv_cache_manager.pool, engine.runner, engine.connector)

    def _note(self, message: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(message)

    def _chain(self, r) -> list[int]:
        chain = self._chains.setdefault(r.request_id, [])
        tokens = r.all_token_ids
        h = chain[-1] if chain else hash(("salt", r.cache_salt))
        for t in tokens[len(chain):]:
            h = hash((h, t))
            chain.append(h)
        return chain

    def _wrap(self, pool, runner, connector) -> None:
        allocate, execute = pool.allocate, runner.execute

        def allocate_wrapped(n):
            blocks = allocate(n)
            for b in blocks:
                self._verified[b.block_id] = set()
            return blocks

        def execute_wrapped(sched):
            writes = []
            for s in sched.scheduled:
                r, c = s.request, s.request.num_computed_tokens
                chain = self._chain(r)
                for g, table in enumerate(self.engine.kv_cache_manager.block_ids(r.request_id)):
                    self._check(r.request_id, g, table, range(self.specs[g].needed_from(c), c), chain, "reads")
                    writes.append((r.request_id, g, table, range(c, c + s.num_new_tokens), chain))
            result = execute(sched)
            for rid, g, table, positions, chain in writes:
                self._check(rid, g, table, positions, chain, "computes", computed=True)
            return result

        pool.allocate, runner.execute = allocate_wrapped, execute_wrapped
        for c in getattr(connector, "connectors", [connector]):
            copier = getattr(c, "_copier", None) if c is not None else None
            if copier is None:
                continue
            scatter = copier.scatter

            def scatter_wrapped(block_ids, pages, rows, scatter=scatter):
                for b in block_ids:
                    self._verified[b] = set()
                return scatter(block_ids, pages, rows)

            copier.scatter = scatter_wrapped

    def _check(self, rid: str, g: int, table: list[int], positions: range, chain: list[int], what: str,
               computed: bool = False) -> None:
        import torch
        bs, truth = self.block_size, self.truth
        todo = [p for p in positions if p // bs < len(table) and table[p // bs] != 0
                and (computed or p % bs not in self._verified.get(table[p // bs], ()))]
        if not todo:
            return
        blocks = torch.tensor([table[p // bs] for p in todo])
        slots = torch.tensor([p % bs for p in todo])
        got = self.kv[blocks, :self.num_layers[g], :, slots].float()  # [n, layers, 2, heads, dim]
        known = [(i, truth.rows[(g, chain[p])]) for i, p in enumerate(todo) if (g, chain[p]) in truth.rows]
        if known:
            idx = torch.tensor([i for i, _ in known])
            want = torch.stack([truth.data[row] for _, row in known])
            bad = ((got[idx] - want).abs().amax(dim=(1, 2, 3, 4)) > truth.tol * (1 + want.abs().amax(dim=(1, 2, 3, 4))))
            if bad.any():
                i, row = known[int(bad.nonzero()[0])]
                p = todo[i]
                origin = "a loaded page" if row in truth.from_load else "its computed KV"
                self._note(f"{rid} {what} position {p} of group {g} in block {table[p // bs]}: differs from "
                           f"{origin} for the same tokens by {float((got[i] - truth.data[row]).abs().max()):.3g} "
                           f"({int(bad.sum())} of {len(known)} positions differ)")
        for i, p in enumerate(todo):
            key = (g, chain[p])
            if key not in truth.rows:
                truth.rows[key] = len(truth.data)
                truth.data.append(got[i].clone())
                if not computed:
                    truth.from_load.add(truth.rows[key])
            elif computed and truth.rows[key] in truth.from_load:
                truth.from_load.discard(truth.rows[key])
            self._verified.setdefault(table[p // bs], set()).add(p % bs)
