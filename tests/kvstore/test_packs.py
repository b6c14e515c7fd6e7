"""Small blocks packed into bigger objects (kvstore/tiers/packs.py) on the
real object stores: found by a process that did not write them in about one
request per pack, and every damaged, foreign or replaced pack a miss."""
from __future__ import annotations

import pytest
import torch

from kvtier.kvstore.tiers.packs import MAGIC, encode_index

from kv_helpers import bit_equal, block_keys, random_blocks

PER_PACK = 8


@pytest.fixture(params=["s3", "gcs"])
def packed(request, make_tier, spec_for):
    """packed(**extra) -> (spec, tier): an obj tier whose packs hold PER_PACK test blocks."""
    kind = request.param

    def make(**extra):
        probe = make_tier(spec_for(kind, pack_bytes=0))
        one = probe.codec.encoded_size(block_keys(1)[0])
        spec = spec_for(kind, pack_bytes=PER_PACK * one + one // 2, **extra)
        tier = make_tier(spec)
        assert tier.backend.per_pack == PER_PACK
        return spec, tier

    return make


def record_reads(tier) -> list[list[str]]:
    """The pack objects each backend read asks for."""
    inner, calls = tier.backend.inner, []
    read = inner.read

    def recording(names, sink):
        calls.append(list(names))
        return read(names, sink)

    inner.read = recording
    return calls


def raw(tier, pack: str) -> bytes:
    inner = tier.backend.inner
    return inner.fs.cat_file(inner._path(pack))


def replace(tier, pack: str, data: bytes) -> None:
    inner = tier.backend.inner
    inner.fs.pipe_file(inner._path(pack), data)


def test_blocks_go_in_packs_and_come_back_bit_exact_to_a_fresh_process(packed, make_tier):
    spec, tier = packed()
    keys, blocks = block_keys(36), random_blocks(36)
    # Two store calls: a chain's packs start wherever a call starts.
    assert tier.put(keys[:4], blocks[:4]) == 4
    assert tier.put(keys[4:], blocks[4:]) == 32
    assert sorted(name for name, _, _ in tier.backend.inner.scan()) == sorted([keys[0], *keys[4::PER_PACK]])

    fresh = make_tier(spec)  # knows nothing of where the blocks are
    calls = record_reads(fresh)
    out = torch.zeros_like(blocks)
    got = fresh.get(keys, out)
    assert all(block is not None for block in got) and bit_equal(out, blocks)
    fetched = [name for call in calls for name in call]
    packs = [keys[0], *keys[4::PER_PACK]]
    assert all(fetched.count(pack) == 1 for pack in packs)  # each pack read once
    assert len(fetched) <= 2 * len(packs) < len(keys) / 3  # guesses of where packs start may miss

    again = make_tier(spec)
    assert again.exists(keys) == 36 and again.contains(keys[::-1]) == [True] * 36


def test_a_chain_lookup_stops_at_the_first_block_no_pack_holds(packed, make_tier):
    spec, tier = packed()
    keys, blocks = block_keys(20), random_blocks(20)
    tier.put(keys[:12], blocks[:12])
    tier.put(keys[13:], blocks[13:])  # block 12 never stored
    fresh = make_tier(spec)
    assert fresh.exists(keys) == 12
    got = fresh.get(keys[:12] + keys[13:])
    assert all(block is not None for block in got)
    assert fresh.get(keys[12:13]) == [None]


def test_a_damaged_member_is_a_counted_miss_and_its_pack_is_dropped(packed, make_tier):
    spec, tier = packed()
    keys, blocks = block_keys(PER_PACK), random_blocks(PER_PACK)
    tier.put(keys, blocks)
    data = bytearray(raw(tier, keys[0]))
    data[-7] ^= 0x40  # a bit of the last member's payload
    replace(tier, keys[0], bytes(data))

    fresh = make_tier(spec)
    out = torch.zeros_like(blocks)
    got = fresh.get(keys, out)
    assert got[-1] is None and fresh.stats.corrupt == 1
    assert all(block is not None for block in got[:-1])
    assert bit_equal(out[:-1], blocks[:-1])  # served before the damage, each verified on its own
    assert not list(fresh.backend.inner.scan())  # the pack is gone
    assert fresh.exists(keys) == 0


@pytest.mark.parametrize("damage", ["truncated", "index bit flip", "empty", "index of another pack"])
def test_a_pack_whose_index_does_not_hold_is_a_miss_for_all_of_it(packed, make_tier, damage):
    spec, tier = packed()
    keys, blocks = block_keys(PER_PACK), random_blocks(PER_PACK)
    tier.put(keys, blocks)
    data = raw(tier, keys[0])
    if damage == "truncated":
        data = data[:-100]
    elif damage == "index bit flip":
        data = data[:9] + bytes([data[9] ^ 0x7F]) + data[10:]
    elif damage == "empty":
        data = b""
    else:  # a well-formed index naming other blocks, over these bytes
        others = block_keys(PER_PACK)
        sizes = [tier.codec.encoded_size(key) for key in keys]
        old = len(encode_index(keys, sizes))
        data = encode_index(others, sizes) + data[old:]
    replace(tier, keys[0], data)

    fresh = make_tier(spec)
    got = fresh.get(keys)
    assert got == [None] * PER_PACK
    assert fresh.exists(keys) == 0 and fresh.contains(keys) == [False] * PER_PACK


def test_another_formats_pack_is_a_miss_left_alone(packed, make_tier):
    spec, tier = packed()
    keys, blocks = block_keys(PER_PACK), random_blocks(PER_PACK)
    tier.put(keys, blocks)
    data = raw(tier, keys[0])
    foreign = MAGIC + bytes([data[4] + 1]) + data[5:]  # the next pack version
    replace(tier, keys[0], foreign)

    fresh = make_tier(spec)
    assert fresh.get(keys) == [None] * PER_PACK
    assert raw(fresh, keys[0]) == foreign  # still there, for whoever it belongs to


def test_a_pack_rewritten_by_another_writer_serves_only_what_it_holds_now(packed, make_tier):
    """This process remembers where a block was; the pack's own index decides."""
    spec, tier = packed()
    keys, blocks = block_keys(PER_PACK), random_blocks(PER_PACK)
    tier.put(keys, blocks)
    other = make_tier(spec)
    other.backend.inner.delete([keys[0]])
    other.put(keys[:2], blocks[:2])  # a shorter pack under the same name
    out = torch.zeros_like(blocks)
    got = tier.get(keys, out)
    assert [block is not None for block in got] == [True, True] + [False] * (PER_PACK - 2)
    assert bit_equal(out[:2], blocks[:2])


def test_evicting_a_block_drops_its_whole_pack_from_the_index(packed, make_tier):
    probe_spec, probe = packed()
    one = probe.codec.encoded_size(block_keys(1)[0])
    spec, tier = packed(max_bytes=int(2.5 * PER_PACK * one))
    keys, blocks = block_keys(3 * PER_PACK), random_blocks(3 * PER_PACK)
    for start in range(0, len(keys), PER_PACK):
        tier.put(keys[start:start + PER_PACK], blocks[start:start + PER_PACK])
    # The third pack evicted the first block, so the whole first pack went.
    usage = tier.usage()
    assert usage["blocks"] == 2 * PER_PACK and usage["used_bytes"] <= usage["capacity_bytes"]
    assert tier.contains(keys) == [False] * PER_PACK + [True] * (2 * PER_PACK)
    assert tier.stats.evictions == PER_PACK

    restarted = make_tier(spec)  # rebuilds its index from the packs' indexes
    assert restarted.usage()["blocks"] == 2 * PER_PACK
    assert restarted.exists(keys[PER_PACK:]) == 2 * PER_PACK


def test_deleting_a_block_deletes_the_blocks_stored_with_it(packed):
    _, tier = packed()
    keys, blocks = block_keys(2 * PER_PACK), random_blocks(2 * PER_PACK)
    tier.put(keys, blocks)
    tier.delete([keys[3]])
    assert tier.contains(keys) == [False] * PER_PACK + [True] * PER_PACK
