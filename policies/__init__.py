"""Pure decisions over plain data: cache (eviction) policies and request policies."""
from .arc import ARCPolicy
from .cache_policy import CachePolicy
from .lfu import LFUPolicy
from .loading import load_object
from .lru import LRUPolicy
from .registry import (
    CACHE_POLICIES,
    REQUEST_POLICIES,
    cache_policy_factory,
    make_cache_policy,
    make_request_policy,
)
from .request_policy import (
    DefaultRequestPolicy,
    RequestDecision,
    RequestInfo,
    SizeThresholdPolicy,
)
from .s3fifo import S3FIFOPolicy

__all__ = [
    "ARCPolicy", "CachePolicy", "LFUPolicy", "LRUPolicy", "S3FIFOPolicy",
    "CACHE_POLICIES", "REQUEST_POLICIES", "cache_policy_factory", "make_cache_policy",
    "make_request_policy", "load_object", "DefaultRequestPolicy", "RequestDecision",
    "RequestInfo", "SizeThresholdPolicy",
]
