"""The redis tier on a real three-node Redis Cluster (tests/servers.py's
redis_cluster): blocks of several pieces spread over the nodes by slot, one
hash slot per block, a node that dies and comes back, and the cluster spec."""
from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from kvtier.kvstore.tiers import build_tier, parse_tier_spec
from kvtier.kvstore.validation import ConfigError

import servers

sys.path.insert(0, str(Path(__file__).parent / "kvstore"))
from kv_helpers import bit_equal, block_keys, random_blocks, tier_context  # noqa: E402

BIG = (8, 2, 128, 8, 128)  # float32: 8 MiB a block, so three pieces of under 3 MiB
FAST_BACKOFF = {"backoff_s": 0.2, "max_backoff_s": 0.2, "timeout_s": 0.5}


@pytest.fixture(scope="module")
def cluster():
    with servers.redis_cluster() as running:
        yield running


@pytest.fixture
def make_tier():
    built = []

    def make(spec: dict, **context):
        tier = build_tier({"type": "redis", "key_prefix": f"t{uuid.uuid4().hex[:8]}:", **spec}, tier_context(**context))
        built.append(tier)
        return tier

    yield make
    for tier in built:
        tier.close()


def _wait_out_backoff() -> None:
    time.sleep(FAST_BACKOFF["max_backoff_s"] + 0.05)


def _node_clients(cluster) -> list[redis.Redis]:
    return [redis.Redis(host=servers.HOST, port=port, socket_timeout=5) for port in cluster.ports]


def _where(clients: list[redis.Redis], tier) -> dict[bytes, int]:
    """Each of the tier's keys, and the node that holds it (SCAN lists a node's own keys)."""
    return {key: i for i, client in enumerate(clients) for key in client.scan_iter(match=f"{tier.backend.key_prefix}*")}


def test_blocks_of_several_pieces_go_to_every_node_one_slot_a_block(cluster, make_tier):
    tier = make_tier({"startup_nodes": cluster.urls}, shape=BIG)
    keys = block_keys(12, namespace="pieces")  # fixed names: the same slots, so the same nodes, every run
    blocks = random_blocks(12, shape=BIG)
    assert tier.put(keys, blocks) == 12
    got = tier.get(keys)
    assert all(bit_equal(a, b) for a, b in zip(got, blocks))
    assert tier.contains(keys) == [True] * 12 and tier.exists(keys) == 12

    clients = _node_clients(cluster)
    where = _where(clients, tier)
    size = tier.codec.encoded_size(keys[0])
    pieces = [tier.backend._keys(key, size) for key in keys]
    assert sorted(where) == sorted(piece for block in pieces for piece in block)
    for block in pieces:
        assert len(block) == 3
        first = clients[0].execute_command("CLUSTER KEYSLOT", block[0])
        assert all(clients[0].execute_command("CLUSTER KEYSLOT", piece) == first for piece in block[1:])
        assert len({where[piece] for piece in block}) == 1  # so one node holds the whole block
    assert set(where.values()) == {0, 1, 2}

    tier.delete(keys[:4])  # keys of several slots and nodes in one call
    assert tier.contains(keys) == [False] * 4 + [True] * 8
    assert sorted(_where(clients, tier)) == sorted(piece for block in pieces[4:] for piece in block)


def test_a_node_down_costs_misses_and_the_tier_recovers_by_itself(cluster, make_tier):
    tier = make_tier({"url": cluster.url, "cluster": True, **FAST_BACKOFF})
    keys, blocks = block_keys(30), random_blocks(30)
    assert tier.put(keys, blocks) == 30
    where = _where(_node_clients(cluster), tier)
    owners = [where[tier.backend._keys(key, 0)[0]] for key in keys]
    down = 0  # the node named in `url`: finding the cluster again goes through the others
    lost = [i for i, owner in enumerate(owners) if owner == down]
    kept = [i for i, owner in enumerate(owners) if owner != down]
    assert lost and kept

    cluster.stop_node(down)
    try:
        # Each call made after the back-off, so that it reaches the cluster; none raises.
        got = tier.get(keys)  # misses, for that node's blocks at least
        assert all(got[i] is None for i in lost)
        assert all(bit_equal(got[i], blocks[i]) for i in kept if got[i] is not None)
        assert not tier.healthy and tier.stats.snapshot()["errors"] == 1
        _wait_out_backoff()
        assert not any(tier.contains(keys)[i] for i in lost)
        _wait_out_backoff()
        assert tier.exists(keys) <= lost[0]
        _wait_out_backoff()
        assert tier.put([keys[i] for i in lost], blocks[lost]) == 0  # a batch with blocks for the node down
        _wait_out_backoff()
        tier.delete([keys[lost[-1]]])
        assert not tier.healthy and tier.stats.snapshot()["errors"] == 5
    finally:
        cluster.start_node(down)  # same port and nodes.conf: it rejoins with its slots, empty

    deadline = time.monotonic() + 10
    while True:
        _wait_out_backoff()
        got = tier.get(keys)
        if tier.healthy or time.monotonic() > deadline:
            break
    assert tier.healthy, tier.health.last_error
    assert all(bit_equal(got[i], blocks[i]) for i in kept)
    assert all(got[i] is None for i in lost)  # no persistence: what it held is gone
    assert tier.contains(keys) == [owner != down for owner in owners]
    assert tier.put([keys[i] for i in lost], blocks[lost]) == len(lost)
    assert all(bit_equal(a, b) for a, b in zip(tier.get(keys), blocks))


def _move_slot(cluster, slot: int, source: int, target: int) -> None:
    """Migrate a hash slot and its keys from one node to another, as resharding does."""
    clients = _node_clients(cluster)
    ids = [client.execute_command("CLUSTER MYID").decode() for client in clients]
    clients[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
    clients[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
    keys = clients[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
    if keys:
        clients[source].execute_command("MIGRATE", servers.HOST, cluster.ports[target], "", 0, 5000, "KEYS", *keys)
    for client in clients:
        client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])


def test_a_moved_slot_fails_the_batch_once_then_is_found_where_it_went(cluster, make_tier):
    tier = make_tier({"startup_nodes": cluster.urls, **FAST_BACKOFF}, shape=BIG)
    keys, blocks = block_keys(3), random_blocks(3, shape=BIG)
    assert tier.put(keys, blocks) == 3
    first = tier.backend._keys(keys[0], 0)[0]
    slot = _node_clients(cluster)[0].execute_command("CLUSTER KEYSLOT", first)
    home = _where(_node_clients(cluster), tier)[first]
    away = (home + 1) % 3

    _move_slot(cluster, slot, home, away)
    assert tier.put(keys[:1], blocks[:1]) == 0  # a SET answered MOVED: the batch fails, not just that block
    assert not tier.healthy
    _wait_out_backoff()
    assert all(bit_equal(a, b) for a, b in zip(tier.get(keys), blocks))  # routed by a fresh slot map
    assert tier.healthy and _where(_node_clients(cluster), tier)[first] == away

    _move_slot(cluster, slot, away, home)
    assert tier.get(keys)[0] is None and not tier.healthy  # an MGET answered MOVED
    _wait_out_backoff()
    assert all(bit_equal(a, b) for a, b in zip(tier.get(keys), blocks))
    assert tier.put(keys, blocks) == 3 and tier.healthy


def test_a_cluster_that_is_not_there_is_only_misses(make_tier):
    tier = make_tier({"startup_nodes": [f"redis://{servers.HOST}:{servers.free_port()}"], **FAST_BACKOFF})
    keys, blocks = block_keys(2), random_blocks(2)
    assert tier.put(keys, blocks) == 0
    assert tier.get(keys) == [None, None] and tier.contains(keys) == [False, False]
    assert not tier.healthy and "cannot be connected" in tier.health.last_error


@pytest.mark.parametrize("fields, field", [
    ({"startup_nodes": ["redis://127.0.0.1:7000", "127.0.0.1:7001"]}, "startup_nodes.1"),
    ({"startup_nodes": ["redis://127.0.0.1"]}, "startup_nodes.0"),  # no port
    ({"startup_nodes": ["redis://127.0.0.1:7000/2"]}, "startup_nodes.0"),  # a cluster has db 0 only
    ({"startup_nodes": ["unix:///tmp/redis.sock"]}, "startup_nodes.0"),
    ({"startup_nodes": "redis://127.0.0.1:7000"}, "startup_nodes"),  # a list, not one string
    ({"startup_nodes": []}, "startup_nodes"),
    ({"startup_nodes": ["redis://127.0.0.1:7000", "rediss://127.0.0.1:7001"]}, "startup_nodes"),
])
def test_a_malformed_startup_node_is_named(fields, field):
    with pytest.raises(ConfigError) as caught:
        parse_tier_spec({"type": "redis", **fields})
    assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")


def test_cluster_specs_as_users_write_them():
    spec = parse_tier_spec({"type": "redis", "startup_nodes": ["redis://a:7000", "redis://b:7001"],
                            "password": "s3cret", "timeout_s": 2})
    assert spec.cluster and spec.password.get_secret_value() == "s3cret" and "s3cret" not in repr(spec)
    assert parse_tier_spec({"type": "redis", "url": "rediss://c:7000", "cluster": True}).cluster
    with pytest.raises(ConfigError, match="^startup_nodes.0: a startup node carries no credentials") as caught:
        parse_tier_spec({"type": "redis", "startup_nodes": ["redis://u:s3cret@a:7000"]})
    assert "s3cret" not in str(caught.value)
    for fields, message in [
        ({"url": "unix:///tmp/redis.sock", "cluster": True}, "url: a cluster is reached over redis://"),
        ({"url": "redis://a:7000/3", "cluster": True}, "url: a cluster has database 0 only"),
        ({"url": "redis://a:7000", "startup_nodes": ["redis://b:7001"]}, "startup_nodes: name the cluster's nodes"),
    ]:
        with pytest.raises(ConfigError, match=f"^{message}"):
            parse_tier_spec({"type": "redis", **fields})
