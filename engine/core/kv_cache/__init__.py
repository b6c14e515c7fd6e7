from kvtier.engine.core.kv_cache.block_pool import BlockPool, KVCacheBlock
from kvtier.engine.core.kv_cache.manager import KVCacheManager
from kvtier.engine.core.kv_cache.spec import FullAttentionSpec, KVCacheGroup, SlidingWindowSpec, build_kv_cache_groups

__all__ = [
    "BlockPool", "FullAttentionSpec", "KVCacheBlock", "KVCacheGroup", "KVCacheManager",
    "SlidingWindowSpec", "build_kv_cache_groups",
]
