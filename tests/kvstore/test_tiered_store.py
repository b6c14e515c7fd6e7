"""The tiered store: cascading writes, promotion, prefix lookups, request
tier restrictions, write-back, and many threads at once."""
from __future__ import annotations

import threading

import pytest
import torch

from kvtier.kvstore import TieredStore, tiered_store
from kvtier.kvstore.validation import ConfigError
from kvtier.policies import RequestInfo, make_request_policy

from kv_helpers import FINGERPRINT, SHAPE, bit_equal, block_keys, random_blocks

BLOCK_BYTES = torch.Size(SHAPE).numel() * 4


@pytest.fixture
def make_store():
    stores = []

    def make(specs=(), cpu_blocks=16, **kwargs):
        store = TieredStore(SHAPE, torch.float32, cpu_blocks * BLOCK_BYTES, list(specs), FINGERPRINT, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_writes_go_through_to_every_tier(make_store, spec_for):
    store = make_store([spec_for("fs"), spec_for("redis")])
    keys, blocks = block_keys(4), random_blocks(4)

    written = store.put_async(keys, blocks).result(timeout=30)

    assert written == {"cpu": 4, "fs": 4, "redis": 4}
    for name in ("cpu", "fs", "redis"):
        assert store.lookup(keys, tiers={name}) == 4
    assert store.stats()["cpu"]["pinned"] == 0


def test_a_lower_tier_hit_is_promoted_into_the_cpu_tier(make_store, spec_for):
    store = make_store([spec_for("fs")])
    keys, blocks = block_keys(3), random_blocks(3)
    store.put_async(keys, blocks, tiers={"fs"}).result(timeout=30)
    assert store.lookup(keys, tiers={"cpu"}) == 0

    out = torch.zeros_like(blocks)
    assert store.get_async(keys, out).result(timeout=30) == 3

    assert bit_equal(out, blocks)
    assert store.lookup(keys, tiers={"cpu"}) == 3
    cpu_out = torch.zeros_like(blocks)
    assert store.get_async(keys, cpu_out, tiers={"cpu"}).result(timeout=30) == 3
    assert bit_equal(cpu_out, blocks)


@pytest.mark.parametrize("accept", [True, False], ids=["placed", "declined"])
def test_place_takes_each_run_continuing_the_placed_prefix_and_out_gets_the_rest(make_store, spec_for, accept):
    """The direct path the connector uses on the CPU: the leading run of CPU hits is
    offered as slots of the tier's pool while they are held, then the lower-tier hits
    that continue it (read straight into fresh CPU slots: that is their promotion);
    the rest (a CPU hit after a gap) goes through `out`, as all of it does when declined."""
    store = make_store([spec_for("fs")])
    keys, blocks = block_keys(6), random_blocks(6)
    store.put_async(keys[:2], blocks[:2], tiers={"cpu"}).result(timeout=30)
    store.put_async(keys[2:3], blocks[2:3], tiers={"fs"}).result(timeout=30)
    store.put_async(keys[3:], blocks[3:], tiers={"cpu"}).result(timeout=30)
    placed = torch.zeros_like(blocks)
    offered, pinned = [], []

    def place(pool, positions, slots):
        offered.append(list(positions))
        pinned.append(store.stats()["cpu"]["pinned"])  # held while being copied
        if accept:
            for i, slot in zip(positions, slots):
                placed[i] = pool[slot]
        return accept

    out = torch.zeros_like(blocks)
    assert store.get_async(keys, out, place=place).result(timeout=30) == 6
    assert offered == ([[0, 1], [2]] if accept else [[0, 1]])
    assert pinned == ([5, 1] if accept else [5])
    mine = out.clone()
    if accept:
        mine[:3] = placed[:3]
        assert not out[:3].any()  # placed blocks never touch `out`
    assert bit_equal(mine, blocks)
    stats = store.stats()["cpu"]
    assert stats["pinned"] == 0 and stats["blocks"] == 6  # the fs hit was promoted either way
    assert store.lookup(keys, tiers={"cpu"}) == 6


def test_lookup_and_load_stop_at_the_first_gap(make_store, spec_for):
    store = make_store([spec_for("fs")])
    keys, blocks = block_keys(6), random_blocks(6)
    store.put_async(keys[:2], blocks[:2], tiers={"cpu"}).result(timeout=30)
    store.put_async(keys[2:4], blocks[2:4], tiers={"fs"}).result(timeout=30)
    store.put_async(keys[5:], blocks[5:]).result(timeout=30)  # after the gap at 4

    assert store.lookup(keys) == 4
    assert store.lookup(keys, tiers={"cpu"}) == 2
    assert store.lookup(keys, tiers={"fs"}) == 0
    out = torch.zeros_like(blocks)
    assert store.get_async(keys, out).result(timeout=30) == 4
    assert bit_equal(out[:4], blocks[:4])


def test_a_request_policy_decides_where_blocks_go(make_store, spec_for):
    store = make_store([spec_for("fs")])
    policy = make_request_policy("size_threshold", max_memory_tokens=100)
    short_keys, long_keys, blocks = block_keys(2), block_keys(2), random_blocks(2)

    for keys, tokens in ((short_keys, 50), (long_keys, 5000)):
        decision = policy.on_new_request(RequestInfo("r", num_tokens=tokens))
        store.put_async(keys, blocks, tiers=decision.write_tiers).result(timeout=30)

    assert store.lookup(short_keys, tiers={"fs"}) == 0
    assert store.lookup(short_keys, tiers={"cpu"}) == 2
    assert store.lookup(long_keys, tiers={"fs"}) == 2


def test_write_back_hands_blocks_down_only_when_evicted(make_store, spec_for):
    store = make_store([spec_for("fs")], cpu_blocks=2, write_mode="write_back")
    keys, blocks = block_keys(5), random_blocks(5)

    store.put_async(keys[:2], blocks[:2]).result(timeout=30)
    assert store.flush(timeout=30)
    assert store.lookup(keys[:2], tiers={"fs"}) == 0  # nothing evicted yet: nothing written down

    for i in range(2, 5):
        store.put_async(keys[i:i + 1], blocks[i:i + 1]).result(timeout=30)
    assert store.flush(timeout=30)

    assert [store.lookup([key], tiers={"fs"}) for key in keys] == [1, 1, 1, 0, 0]
    out = torch.zeros_like(blocks)
    assert store.get_async(keys, out).result(timeout=30) == 5
    assert bit_equal(out, blocks)


def test_write_back_skips_blocks_that_came_from_below(make_store, spec_for):
    store = make_store([spec_for("fs"), spec_for("redis")], cpu_blocks=1, write_mode="write_back")
    keys, blocks = block_keys(2), random_blocks(2)
    store.put_async(keys[:1], blocks[:1], tiers={"fs"}).result(timeout=30)
    store.get_async(keys[:1], torch.zeros_like(blocks[:1])).result(timeout=30)  # promoted: clean in cpu

    store.put_async(keys[1:], blocks[1:]).result(timeout=30)  # evicts the promoted block
    assert store.flush(timeout=30)

    assert store.stats()["fs"]["puts"] == 1  # not written again
    assert store.lookup(keys[:1], tiers={"redis"}) == 0


def test_blocks_the_cpu_tier_cannot_hold_still_go_down(make_store, spec_for):
    store = make_store([spec_for("fs")], cpu_blocks=2)
    keys, blocks = block_keys(4), random_blocks(4)
    written = store.put_async(keys, blocks).result(timeout=30)  # a batch pins its own slots: 2 fit
    assert written == {"cpu": 2, "fs": 4}
    blocks.zero_()  # the caller may reuse its buffer as soon as put_async returns
    out = torch.zeros_like(blocks)
    assert store.get_async(keys, out, tiers={"fs"}).result(timeout=30) == 4
    assert not bit_equal(out, blocks)  # the originals, not the zeros


def test_many_threads_putting_and_getting_lose_nothing(make_store, spec_for):
    store = make_store([spec_for("fs"), spec_for("redis")], cpu_blocks=24)
    threads, rounds, per_batch = 6, 8, 3
    expected: dict[str, torch.Tensor] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def client(t: int) -> None:
        for r in range(rounds):
            keys, blocks = block_keys(per_batch, namespace=f"c{t}r{r}"), random_blocks(per_batch)
            with lock:
                expected.update(zip(keys, blocks))
            store.put_async(keys, blocks).result(timeout=60)
            out = torch.zeros_like(blocks)
            loaded = store.get_async(keys, out).result(timeout=60)
            if loaded != per_batch or not bit_equal(out, blocks):
                failures.append(f"client {t} round {r}: {loaded} loaded")

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)

    assert not failures
    assert store.flush(timeout=60)
    keys = list(expected)
    assert len(keys) == threads * rounds * per_batch
    for tier in ("fs", "redis"):
        assert store.lookup(keys, tiers={tier}) == len(keys)
    out = torch.zeros((len(keys), *SHAPE))
    assert store.get_async(keys, out).result(timeout=60) == len(keys)
    assert all(bit_equal(out[i], expected[key]) for i, key in enumerate(keys))
    stats = store.stats()
    assert stats["cpu"]["pinned"] == 0 and stats["cpu"]["blocks"] == 24
    assert stats["fs"]["errors"] == stats["redis"]["errors"] == 0


def test_a_corrupt_lower_tier_object_is_a_miss_through_the_store(make_store, spec_for):
    store = make_store([spec_for("fs")])
    keys, blocks = block_keys(3), random_blocks(3)
    store.put_async(keys, blocks, tiers={"fs"}).result(timeout=30)
    fs = store.tiers["fs"]
    fs.backend.write([keys[1]], [[b"KVTB not a block"]])

    out = torch.zeros_like(blocks)
    assert store.get_async(keys, out).result(timeout=30) == 1
    assert store.stats()["fs"]["corrupt"] == 1
    assert store.lookup(keys) == 1
    # The damaged block was read into a fresh CPU slot: the slot went back unused.
    cpu = store.stats()["cpu"]
    assert cpu["blocks"] == 2 and cpu["pinned"] == 0 and cpu["free_slots"] == 16 - 2
    assert not store.tiers["cpu"].contains(keys)[1]
    assert bit_equal(out[0], blocks[0])


def test_an_object_store_lookup_reads_the_blocks_into_the_cpu_tier_and_stops_past_a_gap(
        make_store, spec_for, monkeypatch):
    """A HEAD costs an object store what a GET does: a lookup reads the blocks
    (verified) into fresh CPU slots, a wave at a time, so the load after it sends
    no request; after a wave with a miss the rest is only asked about."""
    monkeypatch.setattr(tiered_store, "LOOKUP_READ_WAVE", 2)
    store = make_store([spec_for("s3")])
    keys, blocks = block_keys(7), random_blocks(7)
    store.put_async(keys[:3], blocks[:3], tiers={"obj"}).result(timeout=30)
    store.put_async(keys[4:], blocks[4:], tiers={"obj"}).result(timeout=30)

    assert store.contains(keys) == [True, True, True, False, True, True, True]
    obj = store.stats()["obj"]
    assert (obj["reads"], obj["hits"], obj["lookups"]) == (4, 3, 7)  # waves [0, 1], [2, 3]; then HEADs
    assert store.tiers["cpu"].contains(keys) == [True] * 3 + [False] * 4
    cpu = store.stats()["cpu"]
    assert cpu["blocks"] == 3 and cpu["pinned"] == 0
    out = torch.zeros_like(blocks[:3])
    assert store.get_async(keys[:3], out).result(timeout=30) == 3
    assert bit_equal(out, blocks[:3])
    assert store.stats()["obj"]["bytes_out"] == obj["bytes_out"]  # the load sent no request


def test_an_object_store_lookup_reads_no_more_than_half_the_cpu_tier(make_store, spec_for):
    store = make_store([spec_for("s3")], cpu_blocks=16)
    keys, blocks = block_keys(12), random_blocks(12)
    store.put_async(keys, blocks, tiers={"obj"}).result(timeout=30)
    assert store.contains(keys) == [True] * 12
    assert store.stats()["obj"]["reads"] == 8 and store.tiers["cpu"].contains(keys) == [True] * 8 + [False] * 4


def test_a_corrupt_object_read_by_a_lookup_is_a_miss_and_its_slot_goes_back(make_store, spec_for):
    store = make_store([spec_for("s3", pack_bytes=0)])
    keys, blocks = block_keys(3), random_blocks(3)
    store.put_async(keys, blocks, tiers={"obj"}).result(timeout=30)
    store.tiers["obj"].backend.write([keys[1]], [[b"KVTB not a block"]])

    assert store.contains(keys) == [True, False, True]
    assert store.stats()["obj"]["corrupt"] == 1
    cpu = store.stats()["cpu"]
    assert cpu["blocks"] == 2 and cpu["pinned"] == 0 and cpu["free_slots"] == 16 - 2
    assert store.contains(keys) == [True, False, True]  # dropped from the bucket, not read again
    out = torch.zeros_like(blocks)
    assert store.get_async(keys, out).result(timeout=30) == 1
    assert bit_equal(out[0], blocks[0])


@pytest.mark.parametrize("how", ["lookup_reads off", "cpu tier not allowed"])
def test_an_object_store_lookup_without_reads_only_asks(make_store, spec_for, how):
    store = make_store([spec_for("s3", **({"lookup_reads": False} if how == "lookup_reads off" else {}))])
    keys, blocks = block_keys(3), random_blocks(3)
    store.put_async(keys, blocks, tiers={"obj"}).result(timeout=30)
    assert store.contains(keys, tiers={"obj"} if how == "cpu tier not allowed" else None) == [True] * 3
    assert store.stats()["obj"]["reads"] == 0 and store.stats()["cpu"]["blocks"] == 0


def test_a_bad_spec_names_the_field_and_starts_nothing(spec_for):
    with pytest.raises(ConfigError, match="max_bytes"):
        TieredStore(SHAPE, torch.float32, BLOCK_BYTES, [spec_for("fs"), {"type": "fs", "max_bytes": "lots"}])
    with pytest.raises(ValueError, match="write_mode"):
        TieredStore(SHAPE, torch.float32, BLOCK_BYTES, [], write_mode="sometimes")


def test_tier_names_default_to_their_type_and_stay_unique(make_store, spec_for):
    store = make_store([spec_for("fs"), spec_for("fs"), spec_for("fs", name="scratch")])
    assert list(store.tiers) == ["cpu", "fs", "fs2", "scratch"]
    with pytest.raises(ValueError, match="scratch"):
        make_store([spec_for("fs", name="scratch"), spec_for("fs", name="scratch")])


def test_wrong_shapes_are_the_caller_error_and_raise(make_store):
    store = make_store()
    with pytest.raises(ValueError):
        store.put_async(block_keys(2), random_blocks(3))
    with pytest.raises(ValueError):
        store.get_async(block_keys(2), torch.zeros((2, 3)))
    with pytest.raises(ValueError):
        store.put_async(block_keys(1), random_blocks(1, torch.float16))


def test_a_user_cache_policy_runs_the_cpu_tier(make_store, tmp_path):
    path = tmp_path / "newest_out.py"
    path.write_text(
        "class NewestOut:\n"
        "    def __init__(self): self.keys = []\n"
        "    def insert(self, key): self.keys.append(key)\n"
        "    def touch(self, key): pass\n"
        "    def remove(self, key): self.keys.remove(key) if key in self.keys else None\n"
        "    def evict(self, n, protected=()):\n"
        "        out = [k for k in reversed(self.keys) if k not in protected][:n]\n"
        "        for k in out: self.keys.remove(k)\n"
        "        return out\n"
        "    def clear(self): self.keys.clear()\n")
    store = make_store(cpu_blocks=2, eviction_policy="NewestOut", cache_policy_module_path=str(path))
    keys, blocks = block_keys(3), random_blocks(3)
    for i in range(3):
        store.put_async(keys[i:i + 1], blocks[i:i + 1]).result(timeout=30)
    assert [store.lookup([key]) for key in keys] == [1, 0, 1]


@pytest.mark.parametrize("tiers, cpu_blocks", [(None, 16), ({"fs"}, 16), (None, 2)])
def test_the_caller_may_reuse_its_blocks_as_soon_as_put_async_returns(make_store, spec_for, tiers, cpu_blocks):
    """Through the CPU tier, straight to fs, and with a CPU tier too small for the batch."""
    store = make_store([spec_for("fs")], cpu_blocks=cpu_blocks)
    keys, blocks = block_keys(4), random_blocks(4)
    staging = blocks.clone()
    future = store.put_async(keys, staging, tiers=tiers)
    staging.fill_(float("nan"))  # the connector's staging buffer goes to the next save
    future.result(timeout=30)
    out = torch.zeros_like(blocks)
    assert store.get_async(keys, out, tiers={"fs"}).result(timeout=30) == 4
    assert bit_equal(out, blocks)
    if tiers is None:  # what the CPU tier kept is right too
        out = torch.zeros_like(blocks)
        n = store.get_async(keys, out, tiers={"cpu"}).result(timeout=30)
        assert n == min(4, cpu_blocks) and bit_equal(out[:n], blocks[:n])
