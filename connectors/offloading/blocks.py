"""Offload blocks: how device blocks group into the objects the tiers hold,
what a hit of some length needs in each KV cache group, and which device
blocks a load fills.

An offload block is `blocks_per_offload` device blocks of one group, named by
the chained hash of its last device block (so a name stands for the whole
prefix before it). A full-attention group needs every offload block of a hit;
a sliding-window group only those its window reaches at the hit boundary.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvtier.kvstore.keys import layout_id, make_key

from ..base import KVLayout


@dataclass
class LoadPlan:
    """One request's load: per key, the device blocks to fill and the rows of
    the offload block they take."""
    request_id: str
    keys: list[str] = field(default_factory=list)
    dst_blocks: list[list[int]] = field(default_factory=list)
    src_rows: list[list[int]] = field(default_factory=list)

    def failed_blocks(self, num_ok: int) -> set[int]:
        """Device blocks of every key after the first `num_ok`."""
        return {b for blocks in self.dst_blocks[num_ok:] for b in blocks}


class OffloadBlocks:
    def __init__(self, layout: KVLayout, offload_tokens: int, namespace: str) -> None:
        if offload_tokens % layout.block_size:
            raise ValueError(f"kv_transfer_config.kv_connector_extra_config.block_size: {offload_tokens} "
                             f"is not a multiple of the engine block size {layout.block_size}")
        self.layout = layout
        self.tokens = offload_tokens
        self.per_offload = offload_tokens // layout.block_size  # device blocks in one
        self.shape = (self.per_offload, *layout.page_shape)
        self.namespace = namespace
        self._layout_ids = [layout_id(layout.dtype, offload_tokens, g.index, self.shape) for g in layout.groups]

    # -- names -------------------------------------------------------------
    def last_hash(self, block_hashes: Sequence[bytes], j: int) -> bytes:
        return block_hashes[(j + 1) * self.per_offload - 1]

    def key(self, group: int, block_hashes: Sequence[bytes], j: int) -> str:
        return make_key(self.namespace, self.layout.model_fingerprint, self._layout_ids[group],
                        self.last_hash(block_hashes, j))

    def private_key(self, group: int, tag: str) -> str:
        """A name for an object only its writer asks for (a preempted request's
        partial blocks): under a layout no lookup or KV event knows."""
        digest = hashlib.blake2b(tag.encode(), digest_size=16).hexdigest()
        return make_key(self.namespace, self.layout.model_fingerprint, f"{self._layout_ids[group]}.private", digest)

    def group_of(self, key: str) -> int | None:
        """The KV cache group a key of this layout names (None: not ours)."""
        layout = key.rsplit("/", 2)[-2] if key.count("/") >= 2 else ""
        return self._layout_ids.index(layout) if layout in self._layout_ids else None

    @staticmethod
    def hash_of(key: str) -> bytes:
        """The device block hash that names an offload block: the key's last part."""
        return bytes.fromhex(key.rsplit("/", 1)[-1])

    # -- what a hit needs --------------------------------------------------
    def boundary(self, hit: int, num_prompt_tokens: int) -> int:
        """First token computed after a hit of `hit` offload blocks: the prompt's
        last token is always computed, its logits are needed."""
        return min(hit * self.tokens, num_prompt_tokens - 1)

    def first_needed(self, group: int, boundary: int) -> int:
        """First offload block of `group` that a query at `boundary` reads."""
        return self.layout.groups[group].needed_from(boundary) // self.tokens

    def needed(self, group: int, start: int, hit: int, num_prompt_tokens: int) -> range:
        """Offload blocks of `group` a hit of blocks start..hit-1 must load."""
        return range(max(start, self.first_needed(group, self.boundary(hit, num_prompt_tokens))), hit)

    def keys_to_check(self, block_hashes: Sequence[bytes], start: int, end: int) -> list[str]:
        """Every key a lookup of blocks start..end-1 may need, in every group."""
        return [self.key(g.index, block_hashes, j) for j in range(start, end) for g in self.layout.groups]

    def longest_hit(self, block_hashes: Sequence[bytes], start: int, end: int, num_prompt_tokens: int,
                    present: Callable[[str], bool]) -> int:
        """Largest hit <= end (offload blocks from 0) whose needed blocks are all
        present in every group; `start` when there is none."""
        hit = end
        for g in self.layout.groups:
            if g.sliding_window is None:  # a full group needs an unbroken run from start
                j = start
                while j < hit and present(self.key(g.index, block_hashes, j)):
                    j += 1
                hit = j
        while hit > start and not all(
                present(self.key(g.index, block_hashes, j))
                for g in self.layout.groups if g.sliding_window is not None
                for j in self.needed(g.index, start, hit, num_prompt_tokens)):
            hit -= 1
        return hit

    # -- what a load fills -------------------------------------------------
    def load_plan(self, request_id: str, block_hashes: Sequence[bytes], block_ids: list[list[int]],
                  num_computed_tokens: int, boundary: int) -> LoadPlan:
        """Every real device block from the first not yet computed up to the
        boundary, read off the request's tables: a block the engine holds gets
        loaded, a null block (a position a sliding group does not need) never is.
        Keys go block by block across groups, so a miss late in the prompt
        costs only the blocks after it."""
        bs = self.layout.block_size
        first, last = num_computed_tokens // bs, -(-boundary // bs)
        plan = LoadPlan(request_id)
        for j in range(first // self.per_offload, -(-last // self.per_offload)):
            for g in self.layout.groups:
                table = block_ids[g.index]
                rows = [r for r in range(self.per_offload)
                        if first <= j * self.per_offload + r < min(last, len(table))
                        and table[j * self.per_offload + r] != 0]
                if rows:
                    plan.keys.append(self.key(g.index, block_hashes, j))
                    plan.dst_blocks.append([table[j * self.per_offload + r] for r in rows])
                    plan.src_rows.append(rows)
        return plan

    def saveable(self, table: Sequence[int], j: int) -> list[int] | None:
        """Device blocks of offload block j, if the group holds all of them."""
        blocks = list(table[j * self.per_offload:(j + 1) * self.per_offload])
        if len(blocks) < self.per_offload or 0 in blocks:
            return None  # a sliding group already let part of it go
        return blocks
