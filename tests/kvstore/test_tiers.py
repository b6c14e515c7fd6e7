"""Every tier against its real backend: bit-exact round trips, prefix
lookups, deletes, and damaged objects that must come back as misses."""
from __future__ import annotations

import struct

import pytest
import torch

from kvtier.kvstore.block_format import FORMAT_VERSION, BlockCodec

from kv_helpers import ALL_KINDS, SECONDARY_KINDS, SHAPE, bit_equal, block_keys, random_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_round_trip_is_bit_exact(make_tier, kind, dtype):
    tier = make_tier(kind, dtype=dtype)
    keys, blocks = block_keys(5), random_blocks(5, dtype)

    assert tier.put(keys, blocks) == 5
    out = torch.zeros_like(blocks)
    got = tier.get(keys, out)

    assert all(block is not None for block in got)
    assert bit_equal(out, blocks)
    assert tier.stats.puts == 5 and tier.stats.hits == 5


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_exists_is_the_hit_prefix(make_tier, kind):
    tier = make_tier(kind)
    keys, blocks = block_keys(6), random_blocks(6)
    tier.put(keys[:2] + keys[3:], torch.cat([blocks[:2], blocks[3:]]))

    assert tier.exists(keys) == 2
    assert tier.exists(keys[3:]) == 3
    assert tier.exists([]) == 0
    got = tier.get(keys)
    assert [block is None for block in got] == [False, False, True, False, False, False]


def one_object_per_block(kind: str) -> dict:
    """Object stores pack small blocks (test_packs.py has their damage cases); here, one object each."""
    return {"pack_bytes": 0} if kind in ("s3", "gcs") else {}


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_delete_makes_a_miss(make_tier, kind):
    tier = make_tier(kind, **one_object_per_block(kind))
    keys, blocks = block_keys(3), random_blocks(3)
    tier.put(keys, blocks)

    tier.delete(keys[1:2])

    assert tier.exists(keys) == 1
    assert tier.get(keys[1:2]) == [None]
    assert tier.exists(keys[2:]) == 1


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_putting_a_held_block_again_writes_nothing(make_tier, kind):
    tier = make_tier(kind)
    keys, blocks = block_keys(2), random_blocks(2)
    tier.put(keys, blocks)
    written_again = tier.put(keys, blocks)
    if kind in ("cpu", "fs"):  # tiers that index what they hold skip the rewrite
        assert written_again == 0
    assert bit_equal(torch.stack(tier.get(keys)), blocks)


def _encoded(key: str, block: torch.Tensor, fingerprint="model-a") -> bytes:
    return b"".join(bytes(memoryview(part)) for part in BlockCodec(fingerprint, block.dtype, SHAPE).encode(key, block))


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x40]) + data[position + 1:]


# Ours, damaged since it was written: a miss, dropped and counted.
DAMAGE = {
    "truncated": lambda key, block: _encoded(key, block)[:-100],
    "payload bit flip": lambda key, block: _flip(_encoded(key, block), -7),
    "header bit flip": lambda key, block: _flip(_encoded(key, block), 20),
    "empty": lambda key, block: b"",
}
# Someone else's (another release sharing the tier, another model or layout):
# a miss, left where it is, counted apart.
FOREIGN = {
    "other model": lambda key, block: _encoded(key, block, fingerprint="model-b"),
    "other key": lambda key, block: _encoded(key + "x", block),
    "other version": lambda key, block: struct.pack("<4sH", b"KVTB", FORMAT_VERSION + 1) + _encoded(key, block)[6:],
    "not a block": lambda key, block: bytes(range(256)) * 4,
}


def _read_with_one_replaced(tier, make_bytes):
    keys, blocks = block_keys(3), random_blocks(3)
    tier.put(keys, blocks)
    # Replace the middle block through the backend itself: the bytes land where a real writer's would
    # (deleted first: the store daemon keeps the first object put under a key).
    tier.backend.delete([keys[1]])
    tier.backend.write([keys[1]], [[make_bytes(keys[1], blocks[1])]])
    out = torch.zeros_like(blocks)
    got = tier.get(keys, out)
    assert got[1] is None
    assert got[0] is not None and got[2] is not None
    assert bit_equal(out[0], blocks[0]) and bit_equal(out[2], blocks[2])
    return keys


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", SECONDARY_KINDS)
def test_damaged_object_is_a_counted_miss_and_is_removed(make_tier, kind, damage):
    tier = make_tier(kind, **one_object_per_block(kind))
    keys = _read_with_one_replaced(tier, DAMAGE[damage])
    assert tier.stats.corrupt == 1 and tier.stats.foreign == 0
    assert tier.backend.exists([keys[1]]) == 0  # dropped from the tier
    assert tier.exists(keys) == 1


@pytest.mark.parametrize("foreign", list(FOREIGN))
@pytest.mark.parametrize("kind", SECONDARY_KINDS)
def test_someone_elses_object_is_a_miss_left_alone(make_tier, kind, foreign):
    """A rolling upgrade must not wipe a shared tier: another version's object stays."""
    tier = make_tier(kind, **one_object_per_block(kind))
    keys = _read_with_one_replaced(tier, FOREIGN[foreign])
    assert tier.stats.foreign == 1 and tier.stats.corrupt == 0
    assert tier.backend.exists([keys[1]]) == 1  # still there, for whoever it belongs to


@pytest.mark.parametrize("kind", ["cpu", "fs", "redis"])
def test_blocks_contiguous_one_by_one_are_enough(make_tier, kind):
    """Every other block of a batch: a view that is not contiguous as a whole."""
    tier = make_tier(kind)
    keys, blocks = block_keys(2), random_blocks(4)[::2]
    assert not blocks.is_contiguous() and blocks[0].is_contiguous()
    assert tier.put(keys, blocks) == 2
    out = torch.zeros(4, *blocks.shape[1:])[::2]
    assert all(bit_equal(a, b) for a, b in zip(tier.get(keys, out), blocks))
    assert all(bit_equal(a, b) for a, b in zip(out, blocks))
