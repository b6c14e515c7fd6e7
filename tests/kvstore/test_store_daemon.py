"""The `kvtier store` daemon as a real process on 127.0.0.1: bounded memory and
eviction, tenants and quotas, tokens, persistence across a restart or a
crash, a daemon that is down, concurrent clients, and a flood of malformed
frames. The generic tier tests (test_tiers.py) run against it too."""
from __future__ import annotations

import os
import random
import threading
import time

import psutil
import pytest
import torch
import zmq

from kvtier.kvstore.daemon import protocol as wire
from kvtier.kvstore.tiers import build_tier
from kvtier.kvstore.tiers.store import StoreBackend

import servers
from kv_helpers import bit_equal, block_keys, random_blocks, tier_context

MiB = 1 << 20


@pytest.fixture
def daemon_with(tmp_path):
    """daemon_with(*flags, fs=False, token=None) -> a started StoreDaemon, closed after the test."""
    started = []

    def make(*flags: str, fs: bool = False, token: str | None = None) -> servers.StoreDaemon:
        daemon = servers.StoreDaemon(*flags, fs_path=str(tmp_path / "store") if fs else None, token=token)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.close()


def backend(daemon, token: str | None = None, **options) -> StoreBackend:
    return StoreBackend(f"tcp://127.0.0.1:{daemon.port}", token if token is not None else daemon.token or "",
                        **{"timeout_s": 5.0, **options})


def objects(n: int, size: int, namespace: str | None = None) -> tuple[list[str], list[bytes]]:
    keys = block_keys(n, namespace)
    return keys, [os.urandom(size) for _ in range(n)]


def read_all(store: StoreBackend, keys: list[str]) -> list[bytes | None]:
    got: list[bytes | None] = [None] * len(keys)

    def sink(i, reader, size):
        got[i] = reader.read(size)

    store.read(keys, sink)
    return got


def test_memory_is_bounded_and_evicts_through_the_policy(daemon_with):
    daemon = daemon_with("--cpu-bytes", str(8 * MiB))
    store = backend(daemon)
    keys, values = objects(24, MiB)
    for key, value in zip(keys, values):  # one put each, oldest first
        assert store.write([key], [[value]]) == [None]
    stats = store.stats()["memory"]
    assert stats["used_bytes"] <= 8 * MiB and stats["evictions"] >= 16
    got = read_all(store, keys)
    assert got[:8] == [None] * 8  # LRU: the oldest went first
    assert got[-6:] == values[-6:]  # and the newest are whole
    # An object that cannot fit at all is refused with a reply, not taken.
    big, = objects(1, 9 * MiB)[0]
    errors = store.write([big], [[os.urandom(9 * MiB)]])
    assert "no_room" in str(errors[0])
    assert store.stats()["memory"]["refused"] == {"no_room": 1}
    assert 'kvtier_store_refused_puts_total{reason="no_room"}' in _metrics_when(daemon, "no_room")
    store.close()


def metric(page: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in page.splitlines() if line.split(" ")[0] == name)


def _metrics_when(daemon, text: str, timeout: float = 5.0) -> str:
    """The daemon's metrics page once it mentions `text` (the page is refreshed twice a second)."""
    deadline = time.monotonic() + timeout
    while True:
        page = daemon.metrics()
        if text in page or time.monotonic() > deadline:
            return page
        time.sleep(0.1)


def test_a_namespace_quota_evicts_only_its_own_objects(tmp_path, daemon_with):
    config = tmp_path / "store.json"
    config.write_text('{"cpu_bytes": 67108864, "namespace_quotas": {"tenant-a": 4194304}}')
    daemon = daemon_with("--config", str(config))
    store = backend(daemon)
    b_keys, b_values = objects(4, MiB, "tenant-b")
    assert store.write(b_keys, [[v] for v in b_values]) == [None] * 4
    a_keys, a_values = objects(10, MiB, "tenant-a")
    for key, value in zip(a_keys, a_values):
        assert store.write([key], [[value]]) == [None]
    assert read_all(store, b_keys) == b_values  # the other tenant lost nothing
    a_got = read_all(store, a_keys)
    assert sum(v is not None for v in a_got) == 4 and a_got[-4:] == a_values[-4:]
    assert store.stats()["namespaces"]["tenant-a"] == 4 * MiB
    # One object above the quota itself is refused.
    errors = store.write(block_keys(1, "tenant-a"), [[os.urandom(5 * MiB)]])
    assert "quota" in str(errors[0])
    store.close()


def test_tenants_never_see_each_others_blocks(store_srv):
    ctx = tier_context()
    tier = build_tier(store_srv.tier_spec(), ctx)
    blocks = random_blocks(3)
    a_keys = block_keys(3, "tenant-a")
    b_keys = [key.replace("tenant-a/", "tenant-b/", 1) for key in a_keys]  # the same blocks, another tenant
    tier.put(a_keys, blocks)
    assert tier.contains(b_keys) == [False] * 3 and tier.get(b_keys) == [None] * 3
    assert bit_equal(torch.stack(tier.get(a_keys)), blocks)
    tier.close()


def test_without_the_token_nothing_is_served_or_stored(daemon_with):
    daemon = daemon_with("--cpu-bytes", str(16 * MiB), token="s3cret")
    good = build_tier(daemon.tier_spec(backoff_s=0.05), tier_context())
    bad = build_tier(daemon.tier_spec(token="wrong", backoff_s=0.05, max_backoff_s=0.05), tier_context())
    keys, blocks = block_keys(2), random_blocks(2)
    assert good.put(keys, blocks) == 2
    for _ in range(3):  # calls fail quietly: misses, nothing raised
        assert bad.get(keys) == [None, None]
        assert bad.contains(keys) == [False, False]
        assert bad.put(block_keys(1), random_blocks(1)) == 0
        time.sleep(0.06)
    assert sum(count for cause, count in bad.backend.refusals.items() if cause.startswith("unauthorized")) >= 3
    assert bit_equal(torch.stack(good.get(keys)), blocks)
    page = _metrics_when(daemon, "\nkvtier_store_auth_failures_total 3")
    assert metric(page, "kvtier_store_auth_failures_total") >= 3
    # A raw request with no token gets an error reply and nothing else.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{daemon.port}")
    sock.send(wire.encode(wire.Request(wire.VERSION, 7, "get", keys=keys)))
    assert sock.poll(5000)
    frames = sock.recv_multipart()
    reply = wire.decode_reply(frames[0])
    assert (len(frames), reply.ok, reply.code, reply.id) == (1, False, wire.UNAUTHORIZED, 7)
    sock.close(0)
    good.close()
    bad.close()


def test_a_restart_comes_back_with_its_blocks_from_disk(daemon_with):
    daemon = daemon_with("--cpu-bytes", str(64 * MiB), fs=True)
    tier = build_tier(daemon.tier_spec(backoff_s=0.05), tier_context())
    keys, blocks = block_keys(6), random_blocks(6)
    assert tier.put(keys[:3], blocks[:3]) == 3
    daemon.stop()  # SIGTERM: the queued disk writes finish first
    daemon.start()
    time.sleep(0.1)
    assert bit_equal(torch.stack(_until_hit(tier, keys[:3])), blocks[:3])
    assert tier.put(keys[3:], blocks[3:]) == 3
    _wait_for(lambda: tier.backend.stats()["memory"]["persistent"]["fs"]["objects"] == 6)
    daemon.kill()  # a crash: what reached the disk comes back
    daemon.start()
    assert bit_equal(torch.stack(_until_hit(tier, keys)), blocks)
    tier.close()


def test_an_object_store_below_the_disk_brings_the_blocks_back_on_a_new_host(tmp_path, s3_srv):
    """fs_path, then S3 (moto) below it: written through to both; a daemon that
    starts on an empty disk over the same bucket serves what the first stored."""
    import json
    bucket = s3_srv.create_bucket(f"below-{os.getpid()}-{random.randrange(1 << 30)}")
    config = tmp_path / "store.json"
    config.write_text(json.dumps({"secondary_tiers": [s3_srv.tier_spec(bucket)]}))
    first = servers.StoreDaemon("--config", str(config), "--cpu-bytes", str(64 * MiB), fs_path=str(tmp_path / "a"))
    second = servers.StoreDaemon("--config", str(config), "--cpu-bytes", str(64 * MiB), fs_path=str(tmp_path / "b"))
    try:
        first.start()
        tier = build_tier(first.tier_spec(backoff_s=0.05), tier_context())
        keys, blocks = block_keys(5), random_blocks(5)
        assert tier.put(keys, blocks) == 5
        _wait_for(lambda: tier.backend.stats()["memory"]["persistent"]["obj"]["objects"] == 5)
        assert tier.backend.stats()["memory"]["persistent"]["fs"]["objects"] == 5
        tier.close()
        first.close()
        second.start()  # its disk is empty: the bucket's listing is its index
        tier = build_tier(second.tier_spec(backoff_s=0.05), tier_context())
        assert bit_equal(torch.stack(_until_hit(tier, keys)), blocks)
        memory = tier.backend.stats()["memory"]
        assert memory["persistent"]["fs"]["objects"] == 0 and memory["persistent"]["obj"]["objects"] == 5
        assert 'kvtier_store_usage_bytes{tier="obj"}' in second.metrics()
        tier.close()
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("tier, field", [({"type": "redis", "url": "redis://127.0.0.1:1"}, "secondary_tiers.0.type"),
                                         ({"type": "fs", "bogus": 1}, "secondary_tiers.0.bogus")])
def test_a_tier_below_the_daemon_that_cannot_hold_its_objects_stops_start_up(tier, field):
    from kvtier.kvstore.daemon import load_store_config
    from kvtier.kvstore.validation import ConfigError
    with pytest.raises(ConfigError) as error:
        load_store_config(None, {"secondary_tiers": [tier]})
    assert field in str(error.value)


def _until_hit(tier, keys, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = tier.get(keys)
        if all(g is not None for g in got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_daemon_that_is_down_costs_misses_and_the_tier_recovers(daemon_with):
    daemon = daemon_with("--cpu-bytes", str(16 * MiB))
    tier = build_tier(daemon.tier_spec(backoff_s=0.05, max_backoff_s=0.1, timeout_s=1.0), tier_context())
    keys, blocks = block_keys(2), random_blocks(2)
    assert tier.put(keys, blocks) == 2
    daemon.kill()
    started = time.monotonic()
    assert tier.get(keys) == [None, None]  # nothing raised
    assert tier.contains(keys) == [False, False]
    assert tier.put(block_keys(1), random_blocks(1)) == 0
    assert time.monotonic() - started < 5  # each call gives up within its timeout
    assert not tier.healthy
    daemon.start()  # empty: it had no fs persistence
    deadline = time.monotonic() + 10
    while tier.put(keys, blocks) != 2:
        assert time.monotonic() < deadline, "the tier did not come back"
        time.sleep(0.1)
    assert tier.healthy and bit_equal(torch.stack(tier.get(keys)), blocks)
    tier.close()


def test_concurrent_clients_lose_nothing_and_never_see_a_mixed_object(daemon_with):
    """Four clients put different versions of the same keys and read them
    back at once: every read is one whole version, and once a key is held it
    keeps the version first stored."""
    daemon = daemon_with("--cpu-bytes", str(256 * MiB))
    keys = block_keys(16)
    size = 256 * 1024
    versions = {c: [bytes([c]) * size for _ in keys] for c in range(4)}
    failures: list[str] = []

    def client(c: int) -> None:
        store = backend(daemon)
        try:
            for round_ in range(6):
                order = list(range(len(keys)))
                random.Random(c * 10 + round_).shuffle(order)
                store.write([keys[i] for i in order], [[versions[c][i]] for i in order])
                for i, value in enumerate(read_all(store, keys)):
                    if value is not None and value not in {versions[v][i] for v in versions}:
                        failures.append(f"client {c}: key {i} mixed")
        except Exception as error:  # noqa: BLE001 (reported below)
            failures.append(f"client {c}: {error!r}")
        finally:
            store.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    store = backend(daemon)
    final = read_all(store, keys)
    assert all(value is not None for value in final)
    assert read_all(store, keys) == final  # stable: later puts of a held key change nothing
    store.close()


def _malformed(rng: random.Random) -> list[bytes]:
    """One bad request: random bytes, a wrong version, bad counts, huge or bogus sizes, unknown ops."""
    good = {"v": wire.VERSION, "id": rng.randrange(1 << 30), "op": "get", "keys": ["a/b"]}
    kind = rng.randrange(8)
    if kind == 0:
        return [os.urandom(rng.randrange(1, 200))]
    if kind == 1:
        return [wire.encode(wire.Request(rng.choice([0, 2, 99]), 1, "get", keys=["a/b"]))]
    if kind == 2:  # parts promise more frames than came: a truncated payload
        return [wire.encode(wire.Request(wire.VERSION, 1, "put", keys=["a/b", "a/c"], parts=[1, 3])), b"x" * 100]
    if kind == 3:  # sizes that would need terabytes if believed
        return [wire.encode(wire.Request(wire.VERSION, 1, "put", keys=["a/b"], parts=[2 ** 40]))]
    if kind == 4:
        return [wire.encode(wire.Request(wire.VERSION, 1, rng.choice(["GET", "flushall", "", "x" * 300])))]
    if kind == 5:  # keys that would escape the fs root, or are huge
        return [wire.encode(wire.Request(wire.VERSION, 1, "get", keys=[rng.choice(["../etc/passwd", "/abs", ".h",
                                                                                   "a" * 5000, ""])]))]
    if kind == 6:  # valid msgpack, wrong types
        import msgspec
        return [msgspec.msgpack.encode({**good, "keys": rng.choice([5, [1, 2], {"a": 1}, None])})]
    return []  # an empty message


def test_malformed_frames_get_error_replies_and_never_grow_the_daemon(daemon_with):
    daemon = daemon_with("--cpu-bytes", str(32 * MiB))
    process = psutil.Process(daemon.pid)
    store = backend(daemon)
    keys, values = objects(4, 64 * 1024)
    store.write(keys, [[v] for v in values])
    rss_before = process.memory_info().rss
    rng = random.Random(0)
    context = zmq.Context()
    sockets = [context.socket(zmq.DEALER) for _ in range(4)]
    for sock in sockets:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{daemon.port}")
    sent = replies = 0

    def drain(wait_ms: int = 0) -> None:
        nonlocal replies
        for s in sockets:
            while s.poll(wait_ms):
                reply = wire.decode_reply(s.recv_multipart()[0])
                assert not reply.ok and reply.code in (wire.BAD_REQUEST, wire.BAD_VERSION, wire.TOO_LARGE)
                replies += 1

    for n in range(10_000):
        frames = _malformed(rng)
        if frames:
            sockets[n % len(sockets)].send_multipart(frames)
            sent += 1
        if n % 50 == 49:
            drain()
    deadline = time.monotonic() + 30
    while replies < sent and time.monotonic() < deadline:
        drain(100)
    assert replies == sent  # every one answered, with an error
    # A frame larger than max_object_bytes: ZeroMQ drops that connection, the daemon goes on.
    huge = context.socket(zmq.DEALER)
    huge.setsockopt(zmq.LINGER, 0)
    huge.connect(f"tcp://127.0.0.1:{daemon.port}")
    huge.send_multipart([wire.encode(wire.Request(wire.VERSION, 1, "put", keys=["a/b"], parts=[1])),
                         b"\0" * (300 * MiB)])
    time.sleep(1.0)
    assert read_all(store, keys) == values  # a good client is served as before
    assert store.stats()["memory"]["objects"] == 4
    growth = process.memory_info().rss - rss_before
    assert growth < 64 * MiB, f"the daemon grew by {growth / MiB:.0f} MiB"
    assert daemon.running()
    for sock in [*sockets, huge]:
        sock.close(0)
    context.term()
    store.close()
