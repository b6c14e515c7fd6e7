"""One pool of pages shared by every KV cache group.

Free blocks sit in an LRU queue; a freed block keeps its hash (and stays findable
by prefix lookups) until the queue hands it out again.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvtier.connectors import kv_events

# (group index, block hash): hashes are per group because groups hold different layers.
BlockKey = tuple[int, bytes]


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    key: BlockKey | None = None

    @property
    def is_null(self) -> bool:
        return self.block_id == 0


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Block 0 is the null block: a placeholder for sliding-window blocks that
        # fell out of the window. Never allocated, never freed.
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[BlockKey, KVCacheBlock] = {}
        self.num_evicted_cached = 0
        # Called with the key of a cached block whose KV is about to be overwritten.
        self.on_evict = None
        # KV events (kvtier.connectors.kv_events), when they are on: appended here, taken by the engine.
        self.events: list | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    def get_cached(self, key: BlockKey) -> KVCacheBlock | None:
        return self._cached.get(key)

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on blocks found by a prefix lookup."""
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[KVCacheBlock]:
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._drop_hash(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: list[KVCacheBlock]) -> None:
        """Release references; callers pass blocks tail-first so that a request's
        last blocks are reused before its shared prefix."""
        for block in blocks:
            if block.is_null:
                continue
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache(self, block: KVCacheBlock, key: BlockKey) -> bool:
        """Publish a block under `key`; True if it was not published before."""
        if not self.enable_caching or block.is_null or block.key is not None:
            return False
        if key in self._cached:  # an identical block is cached already; keep the first
            return False
        block.key = key
        self._cached[key] = block
        return True

    def _drop_hash(self, block: KVCacheBlock) -> None:
        if block.key is None:
            return
        if self._cached.get(block.key) is block:
            del self._cached[block.key]
            self.num_evicted_cached += 1
            if self.on_evict is not None:
                self.on_evict(block.key)
            if self.events is not None:
                self.events.append(kv_events.removed([block.key[1]], kv_events.DEVICE, block.key[0]))
        block.key = None

    def reset_prefix_cache(self) -> bool:
        if any(b.ref_cnt for b in self.blocks[1:]):
            return False
        events, self.events = self.events, None  # one AllBlocksCleared, not a removal per block
        for block in self.blocks[1:]:
            self._drop_hash(block)
        self.events = events
        if events is not None:
            events.append(kv_events.AllBlocksCleared())
        return True
