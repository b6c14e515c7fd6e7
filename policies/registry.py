"""Policies by name (`eviction_policy`, a request policy name) or from a
user's module path (`cache_policy_module_path`, a request policy module)."""
from __future__ import annotations

import inspect
from collections.abc import Callable

from .arc import ARCPolicy
from .cache_policy import POLICY_METHODS, CachePolicy
from .lfu import LFUPolicy
from .loading import load_object
from .lru import LRUPolicy
from .request_policy import (
    CoercingRequestPolicy,
    DefaultRequestPolicy,
    FunctionRequestPolicy,
    SizeThresholdPolicy,
)
from .s3fifo import S3FIFOPolicy

CACHE_POLICIES: dict[str, type] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "s3-fifo": S3FIFOPolicy,
}

REQUEST_POLICIES: dict[str, type] = {
    "default": DefaultRequestPolicy,
    "size_threshold": SizeThresholdPolicy,
}


def _named(table: dict[str, type], name: str, what: str) -> type:
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}") from None


def cache_policy_factory(
    name: str = "lru", module_path: str | None = None, **kwargs
) -> Callable[[], CachePolicy]:
    """Resolve a policy once and return a builder: each tier needs its own
    instance. With `module_path`, `name` is the class in that module (as
    vLLM's kv_connector names the class of kv_connector_module_path)."""
    target = load_object(module_path, name) if module_path else _named(CACHE_POLICIES, name, "eviction policy")

    def build() -> CachePolicy:
        policy = target(**kwargs)
        missing = [m for m in POLICY_METHODS if not callable(getattr(policy, m, None))]
        if missing:
            raise TypeError(f"cache policy {target!r} lacks {missing}")
        return policy

    build()  # fail at configuration time, not at the first eviction
    return build


def make_cache_policy(name: str = "lru", module_path: str | None = None, **kwargs) -> CachePolicy:
    return cache_policy_factory(name, module_path, **kwargs)()


def make_request_policy(name: str = "default", module_path: str | None = None, **kwargs):
    """A built-in policy by name, or from `module_path`: a class (built with
    `kwargs`), an object with `on_new_request`, or a plain function; with no
    name, the module's own `on_new_request` function."""
    if not module_path:
        return _named(REQUEST_POLICIES, name, "request policy")(**kwargs)
    target = load_object(module_path, "on_new_request" if name == "default" else name)
    if inspect.isclass(target):
        target = target(**kwargs)
    if callable(getattr(target, "on_new_request", None)):
        return CoercingRequestPolicy(target)
    if callable(target):
        return FunctionRequestPolicy(target)
    raise TypeError(f"{module_path!r} is neither a request policy nor a function")
