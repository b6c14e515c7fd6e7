"""Tiers that die, hang or never were: misses and dropped stores, never an
exception; skipped while backing off; back in use once they recover."""
from __future__ import annotations

import time

import pytest
import torch

from kvtier.kvstore import TieredStore

import servers
from kv_helpers import FINGERPRINT, SHAPE, bit_equal, block_keys, random_blocks

BLOCK_BYTES = torch.Size(SHAPE).numel() * 4
FAST_BACKOFF = {"backoff_s": 0.2, "max_backoff_s": 0.2, "timeout_s": 0.5}


@pytest.fixture
def own_redis():
    server = servers.RedisServer().start()
    yield server
    server.close()


def _store(specs, cpu_blocks=64):
    return TieredStore(SHAPE, torch.float32, cpu_blocks * BLOCK_BYTES, specs, FINGERPRINT)


def _wait_out_backoff() -> None:
    time.sleep(FAST_BACKOFF["max_backoff_s"] + 0.05)


def test_redis_killed_mid_run_costs_misses_then_recovers(own_redis):
    with _store([{"type": "redis", "url": own_redis.url, **FAST_BACKOFF}]) as store:
        before, after = block_keys(3), block_keys(3)
        blocks = random_blocks(3)
        assert store.put_async(before, blocks).result(timeout=30)["redis"] == 3

        own_redis.stop()
        written = store.put_async(after, blocks).result(timeout=30)
        out = torch.zeros_like(blocks)
        loaded = store.get_async(before, out, tiers={"redis"}).result(timeout=30)

        assert written == {"cpu": 3, "redis": 0}
        assert loaded == 0
        assert store.lookup(before, tiers={"redis"}) == 0
        assert store.lookup(before) == 3  # the CPU tier still serves
        redis_stats = store.stats()["redis"]
        assert not redis_stats["healthy"] and redis_stats["errors"] >= 1 and redis_stats["dropped"] == 3
        started = time.monotonic()
        assert store.lookup(after, tiers={"redis"}) == 0  # backing off: not even tried
        assert time.monotonic() - started < 0.1

        own_redis.start()  # same port, empty (no persistence)
        _wait_out_backoff()
        assert store.put_async(block_keys(2), blocks[:2], tiers={"redis"}).result(timeout=30)["redis"] == 2
        assert store.stats()["redis"]["healthy"]
        again = block_keys(3)
        store.put_async(again, blocks, tiers={"redis"}).result(timeout=30)
        out = torch.zeros_like(blocks)
        assert store.get_async(again, out, tiers={"redis"}).result(timeout=30) == 3
        assert bit_equal(out, blocks)


def test_a_hung_redis_times_out_into_misses_then_recovers(own_redis):
    with _store([{"type": "redis", "url": own_redis.url, **FAST_BACKOFF}]) as store:
        keys, blocks = block_keys(2), random_blocks(2)
        store.put_async(keys, blocks).result(timeout=30)

        own_redis.pause()
        try:
            started = time.monotonic()
            out = torch.zeros_like(blocks)
            assert store.get_async(keys, out, tiers={"redis"}).result(timeout=30) == 0
            assert time.monotonic() - started < 5 * FAST_BACKOFF["timeout_s"]
            assert not store.stats()["redis"]["healthy"]
        finally:
            own_redis.resume()

        _wait_out_backoff()
        out = torch.zeros_like(blocks)
        assert store.get_async(keys, out, tiers={"redis"}).result(timeout=30) == 2
        assert bit_equal(out, blocks)
        assert store.stats()["redis"]["healthy"]


@pytest.mark.parametrize("spec", [
    {"type": "redis", "url": f"redis://127.0.0.1:{servers.free_port()}/0"},
    {"type": "obj", "bucket": "nowhere", "endpoint_override": f"127.0.0.1:{servers.free_port()}",
     "scheme": "http", "access_key": "a", "secret_key": "b"},
], ids=["redis", "s3"])
def test_a_tier_that_is_not_there_is_only_misses(spec):
    with _store([{**spec, **FAST_BACKOFF}]) as store:
        keys, blocks = block_keys(2), random_blocks(2)
        name = spec["type"]
        assert store.put_async(keys, blocks).result(timeout=30) == {"cpu": 2, name: 0}
        assert store.lookup(keys, tiers={name}) == 0
        assert store.get_async(keys, torch.zeros_like(blocks), tiers={name}).result(timeout=30) == 0
        assert store.get_async(keys, torch.zeros_like(blocks)).result(timeout=30) == 2
        assert not store.stats()[name]["healthy"]


# -- no writer after a read returns ---------------------------------------------

def _slow_sink_for(tier, key: str, seconds: float) -> None:
    read_into = tier.codec.read_into

    def slow(reader, size, k, out):
        if k == key:
            time.sleep(seconds)
        return read_into(reader, size, k, out)

    tier.codec.read_into = slow


@pytest.mark.parametrize("kind", ["fs", "redis", "s3"])
def test_nothing_writes_into_a_buffer_after_a_failed_or_timed_out_read_returns(make_tier, kind):
    from kvtier.kvstore.tiers.redis import RedisBackend

    extra = {"timeout_s": 0.5} if kind == "s3" else {}
    tier = make_tier(kind, **extra)
    keys, blocks = block_keys(4), random_blocks(4)
    assert tier.put(keys, blocks) == 4
    _slow_sink_for(tier, keys[3], 1.5)  # one block lands late
    if kind == "redis":  # ... and another connection of the batch fails meanwhile
        work = RedisBackend._on_connections

        def one_fails(self, count, fn):
            def wrapped(connection, positions):
                if 0 in positions:
                    raise ConnectionError("connection reset")
                fn(connection, positions)
            return work(self, count, wrapped)

        tier.backend._on_connections = one_fails.__get__(tier.backend)
    elif kind == "fs":
        real = tier.backend.read

        def read_then_fail(names, sink):
            real(names, sink)
            raise OSError("disk went away")

        tier.backend.read = read_then_fail
    out = torch.zeros_like(blocks)
    tier.get(keys, out)  # a miss in part or in whole: a timeout, a failed connection, an I/O error
    snapshot = out.clone()
    time.sleep(2.0)  # long past the late block's arrival
    assert torch.equal(out.view(torch.uint8), snapshot.view(torch.uint8)), "a reader wrote after get() returned"
