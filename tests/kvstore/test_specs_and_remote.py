"""Tier specs as users write them, and what only remote tiers do (TTL,
bucket prefixes, capacity over a listed bucket)."""
from __future__ import annotations

import pytest
import redis

from kvtier.kvstore.tiers import parse_tier_spec
from kvtier.kvstore.validation import ConfigError

from kv_helpers import block_keys, random_blocks


def test_the_vllm_obj_json_is_understood():
    spec = parse_tier_spec({"type": "obj", "bucket": "kv-cache", "endpoint_override": "minio:9000",
                            "access_key": "ak", "secret_key": "sk", "scheme": "http"})
    assert (spec.provider, spec.root, spec.endpoint_url) == ("s3", "kv-cache", "http://minio:9000")
    assert "sk" not in repr(spec)  # secrets stay out of logs


@pytest.mark.parametrize("fields, in_flight", [
    ({"endpoint_override": "minio:9000"}, 8),
    ({"endpoint_override": "https://s3.example.com"}, 8),
    ({}, 8),
    ({"endpoint_override": "127.0.0.1:9000"}, "cores"),
    ({"endpoint_override": "http://localhost:9000"}, "cores"),
    ({"endpoint_override": "127.0.0.1:9000", "concurrency": 5}, 5),
])
def test_obj_requests_in_flight_follow_where_the_store_runs(fields, in_flight):
    """A store on this machine shares its cores: no more requests in flight than them."""
    import os

    spec = parse_tier_spec({"type": "obj", "bucket": "b", **fields})
    assert spec.in_flight() == (min(8, max(2, os.cpu_count() or 2)) if in_flight == "cores" else in_flight)


@pytest.mark.parametrize("block_bytes, pack_bytes, per_pack", [
    (741_376, 16 << 20, 16),  # the default model's 16-token block, float32: 22 fit, a power of two kept
    (11_800_000, 16 << 20, 1),  # its 256-token block: one object each, as large as a pack
    (5_900_000, 16 << 20, 2),  # that block in float16
    (741_376, 0, 1),  # packing off
])
def test_obj_packs_as_many_small_blocks_as_fit(block_bytes, pack_bytes, per_pack):
    spec = parse_tier_spec({"type": "obj", "bucket": "b", "pack_bytes": pack_bytes})
    assert spec.blocks_per_pack(block_bytes) == per_pack


def test_obj_pack_bytes_cannot_be_negative():
    with pytest.raises(ConfigError, match="pack_bytes"):
        parse_tier_spec({"type": "obj", "bucket": "b", "pack_bytes": -1})


@pytest.mark.parametrize("fields, provider, root", [
    ({"url": "gs://bucket/some/prefix/"}, "gcs", "bucket/some/prefix"),
    ({"bucket": "gs://bucket"}, "gcs", "bucket"),
    ({"url": "s3://bucket", "prefix": "/kv/"}, "s3", "bucket/kv"),
    ({"bucket": "plain", "prefix": "p"}, "s3", "plain/p"),
])
def test_obj_picks_s3_or_gcs_by_scheme(fields, provider, root):
    spec = parse_tier_spec({"type": "obj", **fields})
    assert (spec.provider, spec.root) == (provider, root)


@pytest.mark.parametrize("spec, message", [
    ({"type": "obj", "url": "ftp://x"}, "obj tier url scheme 'ftp'"),
    ({"type": "obj"}, "needs `bucket` or `url`"),
    ({"type": "obj", "bucket": "b", "scheme": "gopher"}, "scheme: "),
    ({"type": "redis", "url": "http://x"}, "url: url must start with redis://"),
    ({"type": "redis", "ttl": 0}, "ttl: "),
    ({"type": "fs", "path": "/a", "url": "file:///b"}, "not both"),
    ({"type": "fs", "max_bytes": "lots"}, "max_bytes: "),
    ({"type": "fs", "colour": "blue"}, "colour: unknown field"),
    ({"type": "fs", "root_dirr": "/a"}, "root_dirr: unknown field (did you mean root_dir?)"),
    ({"type": "tape"}, "type: unknown tier type 'tape'"),
])
def test_a_bad_spec_raises_naming_the_field(spec, message):
    with pytest.raises(ConfigError) as caught:
        parse_tier_spec(spec)
    assert message in str(caught.value)


def test_vllm_tier_keys_mean_what_they_mean_in_vllm():
    fs = parse_tier_spec({"type": "fs", "root_dir": "/a", "n_read_threads": 3, "n_write_threads": 1,
                          "enable_kv_events": True, "locality": "LOCAL", "backpressure": {"x": 1}})
    assert (fs.path, fs.n_read_threads, fs.n_write_threads, fs.enable_kv_events) == ("/a", 3, 1, True)
    assert parse_tier_spec({"type": "fs", "path": "/b"}).root_dir == "/b"  # kvtier's older key
    nested = parse_tier_spec({"type": "obj", "store_config": {"bucket": "kv", "endpoint_override": "h:9000",
                                                               "access_key": "A", "secret_key": "hush-hush-42"},
                              "io_threads": 3, "prefix": "p"})
    assert (nested.root, nested.endpoint_url, nested.in_flight()) == ("kv/p", "https://h:9000", 3)
    assert "hush-hush-42" not in repr(nested) and nested.secret_key.get_secret_value() == "hush-hush-42"
    remote = parse_tier_spec({"type": "obj", "bucket": "kv", "endpoint_override": "127.0.0.1:9", "locality": "REMOTE"})
    assert remote.in_flight() == 8
    redis_spec = parse_tier_spec({"type": "redis", "url": "redis://user:s3cret@h:6379/2"})
    assert redis_spec.url == "redis://user@h:6379/2" and redis_spec.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(redis_spec)


def test_redis_blocks_expire_after_their_ttl(make_tier, redis_srv):
    tier = make_tier("redis", ttl=30)
    keys = block_keys(2)
    tier.put(keys, random_blocks(2))
    client = redis.Redis.from_url(redis_srv.url)
    ttls = [client.ttl(redis_key) for key in keys for redis_key in tier.backend._keys(key, 0)]
    assert all(0 < ttl <= 30 for ttl in ttls)


def test_redis_tier_accepts_tls_urls():
    assert parse_tier_spec({"type": "redis", "url": "rediss://cache.example:6380/1"}).url.startswith("rediss://")


@pytest.mark.parametrize("pack_bytes", [0, 1 << 20], ids=["one-per-block", "packed"])
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_obj_objects_live_under_the_bucket_prefix(make_tier, spec_for, kind, pack_bytes):
    tier = make_tier(spec_for(kind, prefix="kv/v1", pack_bytes=pack_bytes))
    keys = block_keys(2)
    tier.put(keys, random_blocks(2))
    stored = sorted(name for name, _, _ in tier.backend.scan())
    assert stored == sorted(keys)
    objects = getattr(tier.backend, "inner", tier.backend)
    assert objects.root.endswith("/kv/v1")
    assert len(list(objects.scan())) == (1 if pack_bytes else 2)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_bounded_obj_tier_evicts_and_rebuilds_from_the_bucket(make_tier, spec_for, kind):
    probe = make_tier(spec_for(kind))
    one_block = probe.codec.encoded_size(block_keys(1)[0])
    spec = spec_for(kind, max_bytes=2 * one_block)
    keys, blocks = block_keys(3), random_blocks(3)
    first = make_tier(spec)
    for i in range(3):
        first.put(keys[i:i + 1], blocks[i:i + 1])
    assert [first.exists([key]) for key in keys] == [0, 1, 1]
    first.close()

    second = make_tier(spec)
    assert second.usage()["blocks"] == 2
    assert second.exists(keys[1:]) == 2


def test_redis_cuts_large_blocks_into_pieces_and_a_lost_piece_is_a_miss(make_tier, redis_srv, monkeypatch):
    """Blocks over MAX_PIECE go in near-equal pieces under one hash slot, the
    header piece under the block's own key. Redis as a cache may evict one piece
    of a block: that block must read as a miss, never as other bytes."""
    import kvtier.kvstore.tiers.redis as redis_tier

    from kv_helpers import bit_equal

    monkeypatch.setattr(redis_tier, "MAX_PIECE", 1500)
    tier = make_tier("redis")
    keys, blocks = block_keys(2), random_blocks(2)
    assert tier.put(keys, blocks) == 2
    client = redis.Redis.from_url(redis_srv.url)
    size = tier.codec.encoded_size(keys[0])
    pieces = tier.backend._keys(keys[0], size)
    assert len(pieces) == -(-size // 1500) > 1
    assert all(client.exists(piece) for piece in pieces)
    assert client.getrange(pieces[0], 0, 3) == b"KVTB"
    assert {client.strlen(piece) for piece in pieces} <= {size // len(pieces), size // len(pieces) + 1}
    got = tier.get(keys)
    assert all(bit_equal(a, b) for a, b in zip(got, blocks))

    client.delete(pieces[2])
    got = tier.get(keys)
    assert got[0] is None and bit_equal(got[1], blocks[1])
    assert not any(client.exists(piece) for piece in pieces)  # what was left of it is removed
