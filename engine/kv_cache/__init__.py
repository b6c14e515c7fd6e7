from engine.kv_cache.spec import FullAttentionSpec, KVCacheGroup, SlidingWindowSpec, build_kv_cache_groups
from engine.kv_cache.block_pool import BlockPool, KVCacheBlock
from engine.kv_cache.manager import KVCacheManager

__all__ = [
    "BlockPool", "FullAttentionSpec", "KVCacheBlock", "KVCacheGroup", "KVCacheManager",
    "SlidingWindowSpec", "build_kv_cache_groups",
]
