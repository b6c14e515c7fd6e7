"""Packs: several consecutive blocks in one stored object.

An object store charges per request about what it charges per megabyte (moto
here: one 737 KB GET costs about six times its transfer), so 16-token offload
blocks, one object each, made a 4096-token hit 256 requests. A pack holds up
to `per_pack` blocks that one store call wrote together (a run of one
prompt's chain), under the name of its first block:

    b"KVPK" | version u8 | count u16 | index_len u32 | index | member objects
    index: count x (name_len u16 | name | size u64), members in that order

Each member is a whole block object (block_format), verified on read against
the name it is asked for, so a pack can only ever yield the blocks it names,
checked; a damaged index is a miss for the whole pack.

Finding a block: this process remembers which pack holds each block it wrote
or has read an index of (bounded). Any other block is looked for as a pack's
first block: a chain is walked from its first missing block, and a pack's
index names the blocks after it, so a fresh process finds a prompt's packs
with about one request per pack; the next packs are asked for at the same
time on the guess that they start `per_pack` blocks later. A block inside a
pack that this process cannot reach that way is a miss: hits lost, never a
wrong block.
"""
from __future__ import annotations

import itertools
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from .blob import BlobBackend, Sink

MAGIC = b"KVPK"
VERSION = 1
_PREFIX = struct.Struct("<4sBHI")
_ENTRY = struct.Struct("<H")
_SIZE = struct.Struct("<Q")
MAX_MEMBERS = 4096
MAX_INDEX_BYTES = 4 << 20
# Pack locations remembered, most recently used kept: about 300 bytes each.
MAX_LOCATIONS = 1 << 18


class BadPack(Exception):
    def __init__(self, why: str, ours: bool = True) -> None:
        super().__init__(why)
        self.ours = ours  # False: another format's object, left alone


def encode_index(names: Sequence[str], sizes: Sequence[int]) -> bytes:
    index = bytearray()
    for name, size in zip(names, sizes):
        raw = name.encode()
        index += _ENTRY.pack(len(raw)) + raw + _SIZE.pack(size)
    return _PREFIX.pack(MAGIC, VERSION, len(names), len(index)) + bytes(index)


def index_size(head: bytes) -> int:
    """Bytes of prefix plus index, from the first _PREFIX.size bytes of a pack."""
    if len(head) < _PREFIX.size:
        raise BadPack("truncated prefix")
    magic, version, count, index_len = _PREFIX.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        raise BadPack("not a pack of this version", ours=False)
    if not 0 < count <= MAX_MEMBERS or index_len > MAX_INDEX_BYTES:
        raise BadPack(f"implausible index: {count} members, {index_len} bytes")
    return _PREFIX.size + index_len


def decode_index(head: bytes) -> list[tuple[str, int]]:
    """(name, size) of each member, from the pack's first index_size(head) bytes."""
    _, _, count, index_len = _PREFIX.unpack_from(head)
    end = _PREFIX.size + index_len
    if len(head) < end:
        raise BadPack("truncated index")
    members, at = [], _PREFIX.size
    try:
        for _ in range(count):
            (n,) = _ENTRY.unpack_from(head, at)
            name = head[at + 2:at + 2 + n].decode()
            (size,) = _SIZE.unpack_from(head, at + 2 + n)
            members.append((name, size))
            at += 2 + n + _SIZE.size
    except (struct.error, UnicodeDecodeError) as error:
        raise BadPack(f"bad index: {error}") from None
    if at != end or len(members) != count:
        raise BadPack("index length does not match its entries")
    return members


class _Member:
    """A reader over the next `size` bytes of a pack's reader, no further."""

    def __init__(self, reader, size: int) -> None:
        self._reader = reader
        self.left = size

    def read(self, n: int) -> bytes:
        data = self._reader.read(min(n, self.left))
        self.left -= len(data)
        return data

    def readinto(self, view) -> int:
        view = memoryview(view).cast("B")
        got = self._reader.readinto(view[:min(len(view), self.left)]) if self.left else 0
        self.left -= got
        return got


def _skip(reader, n: int) -> None:
    while n > 0:
        data = reader.read(min(n, 1 << 20))
        if not data:
            raise BadPack("truncated member")
        n -= len(data)


class PackedBackend(BlobBackend):
    """Blocks packed `per_pack` to an object of `inner`, which stores packs
    under its own names (an object store: `read_heads`, ranged reads)."""

    def __init__(self, inner: BlobBackend, per_pack: int) -> None:
        if per_pack < 2:
            raise ValueError("a pack holds at least two blocks")
        self.inner = inner
        self.per_pack = per_pack
        self.read_ahead = max(1, getattr(inner, "concurrency", 2))
        self._where: OrderedDict[str, str] = OrderedDict()  # block name -> pack name
        self._members: dict[str, list[str]] = {}  # pack name -> its blocks, for packs in _where
        self._lock = threading.Lock()

    # -- where blocks are --------------------------------------------------

    def _learn(self, pack: str, members: list[str]) -> None:
        with self._lock:
            self._forget_pack_locked(pack)
            self._members[pack] = members
            for name in members:
                old = self._where.pop(name, None)
                if old is not None and old != pack:
                    self._members.pop(old, None)  # the older pack is found again by its index
                self._where[name] = pack
            while len(self._where) > MAX_LOCATIONS:
                _, evicted = self._where.popitem(last=False)
                self._members.pop(evicted, None)

    def _forget_pack_locked(self, pack: str) -> list[str]:
        members = self._members.pop(pack, [])
        for name in members:
            if self._where.get(name) == pack:
                del self._where[name]
        return members

    def pack_of(self, name: str) -> str | None:
        with self._lock:
            pack = self._where.get(name)
            if pack is not None:
                self._where.move_to_end(name)
            return pack

    def siblings(self, names: Sequence[str]) -> list[str]:
        """Every block that deleting `names` removes: whole packs go."""
        out: dict[str, None] = dict.fromkeys(names)
        with self._lock:
            for name in names:
                pack = self._where.get(name)
                for member in self._members.get(pack, ()) if pack else ():
                    out.setdefault(member)
        return list(out)

    # -- the BlobBackend interface ----------------------------------------

    def write(self, names: Sequence[str], parts: Sequence[list]) -> list[Exception | None]:
        packs, objects = [], []
        for start in range(0, len(names), self.per_pack):
            members = list(names[start:start + self.per_pack])
            bodies = [parts[start + j] for j in range(len(members))]
            sizes = [sum(memoryview(p).nbytes for p in body) for body in bodies]
            objects.append([encode_index(members, sizes), *(p for body in bodies for p in body)])
            packs.append(members)
        errors = self.inner.write([members[0] for members in packs], objects)
        out: list[Exception | None] = []
        for members, error in zip(packs, errors):
            if error is None:
                self._learn(members[0], members)
            out.extend([error] * len(members))
        return out

    def read(self, names: Sequence[str], sink: Sink) -> None:
        positions: dict[str, int] = {}
        for i, name in enumerate(names):
            positions.setdefault(name, i)
        todo = dict.fromkeys(positions)  # names not served yet, in order
        served_lock = threading.Lock()
        asked: set[str] = set()
        damaged: list[str] = []

        def pack_sink(k: int, reader, size: int, packs: list[str]) -> None:
            pack = packs[k]
            try:
                head = reader.read(_PREFIX.size)
                need = index_size(head)
                head += reader.read(need - len(head))
                members = decode_index(head)
                if need + sum(size_ for _, size_ in members) != size:
                    raise BadPack("size does not match its index")
                self._learn(pack, [name for name, _ in members])
                for name, member_size in members:
                    with served_lock:
                        wanted = name in todo
                        if wanted:
                            del todo[name]
                    if not wanted:
                        _skip(reader, member_size)
                        continue
                    member = _Member(reader, member_size)
                    sink(positions[name], member, member_size)  # verifies the block against its name
                    _skip(reader, member.left)
            except BadPack as error:  # a miss for every block not served from it yet
                self._drop(pack)
                if error.ours:
                    damaged.append(pack)

        while todo:
            packs: dict[str, None] = {}
            for name in todo:
                pack = self.pack_of(name)
                if pack is not None and pack not in asked:
                    packs[pack] = None
            if not packs:
                packs = self._walk(list(names), lambda name: name in todo and name not in asked)
            if not packs:
                break  # what is left is in no pack this process can find: misses
            batch = list(packs)
            asked.update(batch)
            self.inner.read(batch, lambda k, reader, size, batch=batch: pack_sink(k, reader, size, batch))
        if damaged:
            self.inner.delete(damaged)

    def _walk(self, names: list[str], open_: Callable[[str], bool]) -> dict[str, None]:
        """Pack names to ask for next: the first open name (a pack may start
        there) and, read ahead, the names one, two ... packs after it."""
        first = next((i for i, name in enumerate(names) if open_(name)), None)
        if first is None:
            return {}
        guesses = (names[j] for j in range(first, len(names), self.per_pack) if open_(names[j]))
        return dict.fromkeys(itertools.islice(guesses, self.read_ahead))

    def _drop(self, pack: str) -> None:
        with self._lock:
            self._forget_pack_locked(pack)

    def exists(self, names: Sequence[str]) -> int:
        # A pack at a time: a prefix usually ends early, no need to ask for all.
        names, held = list(names), 0
        while held < len(names):
            found = self.contains(names[held:held + self.per_pack * self.read_ahead])
            step = found.index(False) if False in found else len(found)
            held += step
            if step < len(found):
                break
        return held

    def contains(self, names: Sequence[str]) -> list[bool]:
        """From the indexes of the packs that hold them: a ranged read of each
        pack's first bytes, walking the chain as `read` does."""
        names = list(names)
        found: set[str] = set()
        asked: set[str] = set()
        while True:
            unresolved = [name for name in dict.fromkeys(names) if name not in found]
            packs = dict.fromkeys(pack for pack in map(self.pack_of, unresolved)
                                  if pack is not None and pack not in asked)
            if not packs:
                packs = self._walk(names, lambda name: name not in found and name not in asked)
            if not packs:
                break
            batch = list(packs)
            asked.update(batch)
            for members in self._indexes(batch):
                found.update(name for name, _ in members or ())
        return [name in found for name in names]

    def _indexes(self, packs: list[str]) -> list[list[tuple[str, int]] | None]:
        """Each pack's members, (name, size), learned; None: not there, or not a readable pack."""
        heads = self.inner.read_heads(packs, 16 << 10)
        out: list[list[tuple[str, int]] | None] = []
        for pack, head in zip(packs, heads):
            members = None
            if head is not None:
                try:
                    need = index_size(head)
                    if need > len(head):
                        head = self.inner.read_heads([pack], need)[0] or b""
                    members = decode_index(head)
                except BadPack:
                    members = None
            if members is None:
                self._drop(pack)
            else:
                self._learn(pack, [name for name, _ in members])
            out.append(members)
        return out

    def delete(self, names: Sequence[str]) -> None:
        packs: dict[str, None] = {}
        with self._lock:
            for name in names:
                packs[self._where.get(name, name)] = None
            for pack in packs:
                self._forget_pack_locked(pack)
        self.inner.delete(list(packs))

    def scan(self) -> Iterable[tuple[str, int, float]]:
        """Every packed block, from each pack's index; a member's size is its own."""
        entries = list(self.inner.scan())
        for start in range(0, len(entries), 64):
            wave = entries[start:start + 64]
            for (_, _, mtime), members in zip(wave, self._indexes([name for name, _, _ in wave])):
                for name, size in members or ():
                    yield name, size, mtime

    def close(self) -> None:
        self.inner.close()
