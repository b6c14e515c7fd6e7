"""Cache policies (eviction order, protection, loading a user's) and request policies."""
from __future__ import annotations

import pytest

from kvtier.policies import (
    ARCPolicy,
    LFUPolicy,
    LRUPolicy,
    RequestDecision,
    RequestInfo,
    S3FIFOPolicy,
    SizeThresholdPolicy,
    cache_policy_factory,
    make_cache_policy,
    make_request_policy,
)

ALL_POLICIES = [LRUPolicy, LFUPolicy, ARCPolicy, S3FIFOPolicy]


def filled(policy_class, keys="abcd"):
    policy = policy_class()
    for key in keys:
        policy.insert(key)
    return policy


@pytest.mark.parametrize("policy_class, touches, order", [
    (LRUPolicy, "a", "bcda"),  # least recently used first
    (LFUPolicy, "aac", "bdca"),  # least frequently used first, ties oldest first
    (ARCPolicy, "b", "acdb"),  # used once before used again
])
def test_eviction_order(policy_class, touches, order):
    policy = filled(policy_class)
    for key in touches:
        policy.touch(key)
    assert policy.evict(4) == list(order)


def test_s3fifo_drops_one_hit_wonders_and_brings_ghosts_back_to_main():
    policy = filled(S3FIFOPolicy)
    policy.touch("b")
    assert policy.evict(1) == ["a"]  # never used again: out of the small queue
    assert policy.evict(1) == ["c"]  # b was used: moved to main, c goes instead
    policy.insert("a")  # a ghost: straight into main
    assert policy.evict(2) == ["d", "b"]
    assert len(policy) == 1 and policy.evict(1) == ["a"]


def _hot_key_hits(policy, capacity=4, rounds=30) -> int:
    """A hot key used between scans of one-time keys, through a cache of `capacity` entries."""
    resident, hits, scan = set(), 0, 0
    for _ in range(rounds):
        accesses = ["hot", "hot"] + [f"scan{scan + i}" for i in range(capacity + 2)]
        scan += capacity + 2
        for key in accesses:
            if key in resident:
                policy.touch(key)
                hits += key == "hot"
                continue
            if len(resident) >= capacity:
                resident -= set(policy.evict(1))
            policy.insert(key)
            resident.add(key)
    return hits


@pytest.mark.parametrize("policy_class", [LFUPolicy, ARCPolicy, S3FIFOPolicy])
def test_frequency_aware_policies_keep_a_hot_key_through_scans_lru_does_not(policy_class):
    lru_hits = _hot_key_hits(LRUPolicy())
    assert _hot_key_hits(policy_class()) > lru_hits + 20


@pytest.mark.parametrize("policy_class", ALL_POLICIES)
def test_protected_keys_are_never_evicted(policy_class):
    policy = filled(policy_class)
    victims = policy.evict(4, protected={"a", "c"})
    assert sorted(victims) == ["b", "d"]
    assert policy.evict(4, protected={"a", "c"}) == []
    assert sorted(policy.evict(4)) == ["a", "c"]


@pytest.mark.parametrize("policy_class", ALL_POLICIES)
def test_removed_and_cleared_keys_are_never_victims(policy_class):
    policy = filled(policy_class)
    policy.remove("b")
    policy.remove("not there")
    assert sorted(policy.evict(10)) == ["a", "c", "d"]
    policy = filled(policy_class)
    policy.clear()
    assert policy.evict(10) == [] and len(policy) == 0


@pytest.mark.parametrize("name, policy_class", [("lru", LRUPolicy), ("LFU", LFUPolicy), ("arc", ARCPolicy),
                                                 ("s3fifo", S3FIFOPolicy), ("s3-fifo", S3FIFOPolicy)])
def test_policies_by_name(name, policy_class):
    assert type(make_cache_policy(name)) is policy_class


def test_an_unknown_policy_name_is_refused():
    with pytest.raises(ValueError, match="mru"):
        make_cache_policy("mru")


USER_CACHE_POLICY = """
class MRUPolicy:
    def __init__(self): self.keys = []
    def insert(self, key): self.keys.append(key)
    def touch(self, key): self.keys.remove(key); self.keys.append(key)
    def remove(self, key): self.keys.remove(key) if key in self.keys else None
    def evict(self, n, protected=()):
        victims = [k for k in reversed(self.keys) if k not in protected][:n]
        for k in victims: self.keys.remove(k)
        return victims
    def clear(self): self.keys.clear()
"""


@pytest.mark.parametrize("how", ["name", "colon"])
def test_a_user_cache_policy_loads_from_a_module_path(tmp_path, how):
    path = tmp_path / "my_policy.py"
    path.write_text(USER_CACHE_POLICY)
    factory = (cache_policy_factory("MRUPolicy", str(path)) if how == "name"
               else cache_policy_factory(module_path=f"{path}:MRUPolicy"))
    policy = factory()
    for key in "abc":
        policy.insert(key)
    assert policy.evict(1) == ["c"]
    assert factory() is not policy  # one instance per tier


def test_a_user_cache_policy_missing_a_method_is_refused(tmp_path):
    path = tmp_path / "half_policy.py"
    path.write_text("class Half:\n    def insert(self, key): pass\n")
    with pytest.raises(TypeError, match="evict"):
        cache_policy_factory("Half", str(path))


def test_default_request_policy_allows_everything():
    decision = make_request_policy().on_new_request(RequestInfo("r1", num_tokens=10, priority=3))
    assert decision == RequestDecision(store=True, read_tiers=None, write_tiers=None, priority=3)


def test_size_threshold_keeps_short_requests_in_memory():
    policy = make_request_policy("size_threshold", max_memory_tokens=1000)
    short = policy.on_new_request(RequestInfo("short", num_tokens=999))
    long = policy.on_new_request(RequestInfo("long", num_tokens=1000))
    assert short.write_tiers == frozenset({"cpu"}) and short.read_tiers is None
    assert long.write_tiers is None
    assert isinstance(policy, SizeThresholdPolicy)


USER_REQUEST_POLICIES = """
def on_new_request(info):
    if info.cache_salt == "secret":
        return {"store": False}
    return {"write_tiers": ["cpu", "fs"], "priority": -1}

class TenantPolicy:
    def __init__(self, tenant):
        self.tenant = tenant
    def on_new_request(self, info):
        return None if info.cache_salt == self.tenant else {"read_tiers": ["cpu"]}
"""


def test_user_request_policies_load_from_a_module_path(tmp_path):
    path = tmp_path / "my_requests.py"
    path.write_text(USER_REQUEST_POLICIES)

    function_policy = make_request_policy(module_path=str(path))
    assert function_policy.on_new_request(RequestInfo("a", 5, cache_salt="secret")).store is False
    decision = function_policy.on_new_request(RequestInfo("b", 5))
    assert decision.write_tiers == frozenset({"cpu", "fs"}) and decision.priority == -1

    class_policy = make_request_policy("TenantPolicy", module_path=str(path), tenant="t1")
    assert class_policy.on_new_request(RequestInfo("c", 5, cache_salt="t1")) == RequestDecision()
    assert class_policy.on_new_request(RequestInfo("d", 5)).read_tiers == frozenset({"cpu"})


def test_a_request_decision_with_unknown_fields_is_refused():
    with pytest.raises(ValueError, match="tiers"):
        RequestDecision.coerce({"tiers": ["cpu"]})
