"""Keys that are safe everywhere, and the self-checking block format."""
from __future__ import annotations

import re

import pytest
import torch

from kvtier.kvstore import layout_id, make_key
from kvtier.kvstore.block_format import FORMAT_VERSION, BlockCodec, CorruptBlockError
from kvtier.kvstore.checksum import checksum, running_checksum

from kv_helpers import bit_equal

SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@pytest.mark.parametrize("namespace, fingerprint, layout, block_hash", [
    ("tenant-1", "llama-3-8b@abc", "float16-t256-g0", b"\x00\xff" * 16),
    ("", ".", "..", "x"),
    ("a/b", "../../etc", "c d\te\n", "é漢字"),
    ("x" * 500, "y", "z", bytes(range(32))),
])
def test_keys_are_safe_paths_object_names_and_redis_keys(namespace, fingerprint, layout, block_hash):
    key = make_key(namespace, fingerprint, layout, block_hash)
    segments = key.split("/")
    assert len(segments) == 4
    assert all(SAFE_SEGMENT.match(segment) and len(segment) <= 120 for segment in segments)
    assert key == make_key(namespace, fingerprint, layout, block_hash)


def test_keys_tell_tenants_models_and_hashes_apart():
    base = make_key("t1", "m1", "L", b"\x01")
    assert base.endswith("/01")
    assert len({base, make_key("t2", "m1", "L", b"\x01"), make_key("t1", "m2", "L", b"\x01"),
                make_key("t1", "m1", "L", b"\x02")}) == 4
    assert make_key("n" * 300, "m", "L", "h") != make_key("n" * 299 + "o", "m", "L", "h")


def test_layout_id_names_version_dtype_block_group_and_shape():
    v = f"v{FORMAT_VERSION}"
    assert layout_id(torch.float16, 256, 1, (30, 2, 256, 3, 64)) == f"{v}-float16-t256-g1-30x2x256x3x64"
    assert layout_id("bfloat16", 16, 0, (2,)) == f"{v}-bfloat16-t16-g0-2"
    # Another release's blocks live under other names: a plain miss, never overwritten.
    assert layout_id("bfloat16", 16, 0, (2,), format_version=FORMAT_VERSION + 1) != layout_id("bfloat16", 16, 0, (2,))


def test_checksum_is_xxh3_64_and_streams():
    assert checksum(b"") == 0x2D06800538D394C2  # XXH3-64 of nothing, seed 0 (the reference test vector)
    assert checksum(memoryview(b"xx123456789")[2:]) == checksum(b"123456789")
    running = running_checksum()
    for part in (b"1234", memoryview(b"56789")):
        running.update(part)
    assert running.intdigest() == checksum(b"123456789")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_codec_round_trip(dtype):
    codec = BlockCodec("m", dtype, (3, 5), num_tokens=5)
    block = (torch.randn(3, 5) * 10).to(dtype)
    blob = b"".join(bytes(memoryview(p)) for p in codec.encode("k", block))
    assert len(blob) == codec.encoded_size("k")
    assert bit_equal(codec.decode(blob, "k"), block)


def _with_header(blob, header: bytes) -> bytes:
    """The object with its JSON header replaced (padded, correctly checksummed)."""
    from kvtier.kvstore.block_format import _PREFIX, FORMAT_VERSION, MAGIC
    from kvtier.kvstore.checksum import checksum
    header_len = _PREFIX.unpack_from(blob)[2]
    padded = header + b" " * (header_len - len(header))
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, header_len, checksum(padded)) + padded + blob[_PREFIX.size + header_len:]


def _blob(codec, key="k", block=None):
    block = torch.ones(codec.shape, dtype=codec.dtype) if block is None else block
    return b"".join(bytes(memoryview(p)) for p in codec.encode(key, block))


@pytest.mark.parametrize("make_bad, reason", [
    (lambda blob: blob[:10], "truncated"),
    (lambda blob: blob[:-1], "truncated"),
    (lambda blob: blob + b"\x00", "truncated"),
    (lambda blob: b"XXXX" + blob[4:], "magic"),
    (lambda blob: blob[:4] + b"\x09\x00" + blob[6:], "version"),
    (lambda blob: blob[:30] + bytes([blob[30] ^ 1]) + blob[31:], "header"),
    (lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]), "checksum"),
    (lambda blob: _blob(BlockCodec("other-model", torch.float32, (3, 5))), "foreign"),
    (lambda blob: _blob(BlockCodec("m", torch.float32, (3, 5), num_tokens=4)), "foreign"),
    (lambda blob: _blob(BlockCodec("m", torch.float32, (3, 5)), key="k2"), "foreign"),
    (lambda blob: _blob(BlockCodec("m", torch.float16, (3, 5))), "foreign"),
    # An aligned header length past the object's end: refused before it sizes a read.
    (lambda blob: blob[:6] + ((1 << 31) - 18).to_bytes(4, "little") + blob[10:], "truncated"),
    # A header whose checksum holds but which is not a block header.
    (lambda blob: _with_header(blob, b"[1, 2]"), "header"),
    (lambda blob: _with_header(blob, b'{"key": "k"}'), "header"),
])
def test_codec_refuses_damaged_or_foreign_objects(make_bad, reason):
    codec = BlockCodec("m", torch.float32, (3, 5))
    with pytest.raises(CorruptBlockError) as caught:
        codec.decode(make_bad(_blob(codec)), "k")
    assert caught.value.reason == reason


def test_codec_refuses_to_encode_a_block_of_another_shape():
    with pytest.raises(ValueError):
        BlockCodec("m", torch.float32, (3, 5)).encode("k", torch.ones(5, 3))


def test_header_is_json_and_a_reordered_header_still_reads():
    """The writer's header is exactly json.dumps of its fields (the reader compares
    bytes first); a header with the same fields in another order takes the JSON path."""
    import json

    codec = BlockCodec("m", torch.float32, (3, 5), num_tokens=5)
    block = torch.randn(3, 5)
    blob = _blob(codec, block=block)
    header_len = 4096 - 18
    header = json.loads(blob[18:18 + header_len])
    assert blob[18:18 + header_len].rstrip(b" ") == json.dumps(header).encode()
    reordered = json.dumps(dict(reversed(list(header.items())))).encode()
    assert bit_equal(codec.decode(_with_header(blob, reordered), "k"), block)
    bad_digits = json.dumps({**header, "checksum": "z" * 16}).encode()
    with pytest.raises(CorruptBlockError) as caught:
        codec.decode(_with_header(blob, bad_digits), "k")
    assert caught.value.reason == "checksum"


def test_codec_reads_and_writes_byte_arrays_over_a_block():
    from kvtier.kvstore.buffers import byte_view

    codec = BlockCodec("m", torch.bfloat16, (3, 5))
    block = torch.randn(3, 5).to(torch.bfloat16)
    blob = b"".join(bytes(memoryview(p)) for p in codec.encode("k", byte_view(block)))
    assert blob == _blob(codec, block=block)
    out = torch.empty(3, 5, dtype=torch.bfloat16)
    import io
    codec.read_into(io.BytesIO(blob), len(blob), "k", byte_view(out))
    assert bit_equal(out, block)
    with pytest.raises(ValueError):
        codec.encode("k", byte_view(block)[:-1])
