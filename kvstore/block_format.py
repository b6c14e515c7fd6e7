"""The stored form of one offload block: a header, then the raw tensor bytes.

    prefix   magic b"KVTB", format version (u16), header length (u32),
             XXH3-64 of the header (u64), little endian
    header   JSON: key, model fingerprint, dtype, shape, token count,
             payload length, XXH3-64 of the payload; padded with spaces
             so that the payload starts on a 4 KiB boundary
    payload  the tensor's bytes, C order

A reader checks all of it before one byte is reported as a hit: a short,
corrupt, foreign (other key, model or layout) or other-version object raises
CorruptBlockError and is never returned. The payload is written from and read
into the tensor's own memory, without an intermediate copy.

Both directions take a tensor or a byte array over its memory. I/O threads
get byte arrays made on the caller's thread: a torch call on a helper thread
waits for the GIL behind the other helper, and cost the fs tier 0.1 ms per
6 MB block read on two threads (a torch index or view on the helper side,
measured against the same loop without it).
"""
from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence

import numpy as np
import torch

from .buffers import byte_view
from .checksum import checksum, running_checksum
from .keys import dtype_name

MAGIC = b"KVTB"
FORMAT_VERSION = 2  # 1 used CRC-32C
_PREFIX = struct.Struct("<4sHIQ")
# Payloads start page-aligned in the object: the kernel copies a misaligned
# file range into an aligned tensor 40% slower (measured on these machines).
_ALIGN = 4096


# An object that is not of this format version, model or layout is someone
# else's (another release sharing the tier during a rolling upgrade, another
# model): a miss, and left where it is. Only our own objects found damaged are
# removed.
NOT_OURS = frozenset({"magic", "version", "foreign"})


class CorruptBlockError(Exception):
    """A stored object that must not be used; `reason` says why:
    truncated, magic, version, header, foreign or checksum."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason

    @property
    def ours(self) -> bool:
        """Written by this format version for this model and layout, and damaged since."""
        return self.reason not in NOT_OURS


def _read_exact(reader, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


_ZERO_CHECKSUM = b'"checksum": "0000000000000000"'
_CHUNK = 1 << 20  # checksum each MiB as it lands, while it is still in cache


def _readinto_checked(reader, view: memoryview) -> tuple[int, int]:
    """Fill `view` from `reader`; returns (bytes read, checksum of them)."""
    got, running = 0, running_checksum()
    while got < len(view):
        n = reader.readinto(view[got:got + _CHUNK])
        if not n:
            break
        running.update(view[got:got + n])
        got += n
    return got, running.intdigest()


class BlockCodec:
    """Encodes and verifies the blocks of one model fingerprint, dtype and shape."""

    def __init__(self, model_fingerprint: str, dtype: torch.dtype, shape: Sequence[int], num_tokens: int = 0) -> None:
        self.model_fingerprint = model_fingerprint
        self.dtype = dtype
        self.shape = tuple(int(d) for d in shape)
        self.num_tokens = num_tokens
        self.payload_nbytes = torch.Size(self.shape).numel() * torch.empty((), dtype=dtype).element_size()
        self._expected = {
            "fingerprint": model_fingerprint,
            "dtype": dtype_name(dtype),
            "shape": list(self.shape),
            "tokens": num_tokens,
            "nbytes": self.payload_nbytes,
        }
        self._fields = json.dumps(self._expected).encode()[1:-1]

    def _payload(self, block) -> np.ndarray:
        """A block's bytes: from a tensor of this codec's dtype and shape, or a byte array of its size."""
        if isinstance(block, torch.Tensor):
            if block.dtype != self.dtype or tuple(block.shape) != self.shape:
                raise ValueError(f"block {tuple(block.shape)} {block.dtype} is not {self.shape} {self.dtype}")
            return byte_view(block)
        if block.dtype != np.uint8 or block.nbytes != self.payload_nbytes:
            raise ValueError(f"a byte array of {block.nbytes} bytes is not a block of {self.payload_nbytes}")
        return block

    def encode(self, key: str, block) -> list:
        """The object as buffers to write one after the other (header, payload)."""
        payload = self._payload(block)
        header = self._header(key, checksum(payload))
        return [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), checksum(header)) + header, payload]

    def encoded_size(self, key: str) -> int:
        """Size of the stored object for `key`, known before its checksum."""
        return _PREFIX.size + len(self._header(key, 0)) + self.payload_nbytes

    def _header(self, key: str, payload_checksum: int) -> bytes:
        # A fixed-width checksum keeps the size computable ahead of the write.
        # Byte for byte json.dumps({"key": key, **self._expected, "checksum": ...}),
        # with only the key encoded per call.
        header = b'{"key": %s, %s, "checksum": "%016x"}' % (json.dumps(key).encode(), self._fields, payload_checksum)
        return header + b" " * (-(_PREFIX.size + len(header)) % _ALIGN)

    def _stored_checksum(self, raw: bytes, key: str) -> str:
        """The payload checksum a verified header records, if the header is
        this key's and this codec's. The usual case, a header byte for byte
        as this codec writes it, is decided without parsing JSON."""
        expected = self._header(key, 0)
        end = expected.rindex(_ZERO_CHECKSUM) + len(_ZERO_CHECKSUM) - 1  # the closing quote
        at = end - 16
        if len(raw) == len(expected) and raw[:at] == expected[:at] and raw[end:] == expected[end:]:
            return raw[at:end].decode("ascii", errors="replace")
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise CorruptBlockError("header", str(e)) from None
        if not isinstance(header, dict) or not isinstance(header.get("checksum"), str):
            raise CorruptBlockError("header", "not a block header")
        if header.get("key") != key or any(header.get(k) != v for k, v in self._expected.items()):
            raise CorruptBlockError("foreign", f"{header.get('key')} {header.get('fingerprint')}")
        return header["checksum"]

    def read_into(self, reader, size: int, key: str, out) -> None:
        """Read one object of `size` bytes from `reader` (read/readinto) into
        `out`, a block tensor or a byte array over one."""
        # Prefix and header fill the first 4 KiB (or a multiple): one read, not two.
        head = _read_exact(reader, min(size, _ALIGN))
        if len(head) < _PREFIX.size:
            raise CorruptBlockError("truncated", "no prefix")
        magic, version, header_len, header_checksum = _PREFIX.unpack_from(head)
        if magic != MAGIC:
            raise CorruptBlockError("magic")
        if version != FORMAT_VERSION:
            raise CorruptBlockError("version", f"{version} != {FORMAT_VERSION}")
        header_end = _PREFIX.size + header_len
        if header_end % _ALIGN:
            raise CorruptBlockError("header", "payload not aligned")
        if header_end > size:  # before a corrupt length can size a read
            raise CorruptBlockError("truncated", f"header of {header_len} bytes in {size}")
        if header_end > len(head):
            head += _read_exact(reader, header_end - len(head))
        raw = head[_PREFIX.size:]
        if len(raw) < header_len:
            raise CorruptBlockError("truncated", "short header")
        if checksum(raw) != header_checksum:
            raise CorruptBlockError("header", "checksum")
        stored_checksum = self._stored_checksum(raw, key)
        if size != header_end + self.payload_nbytes:
            raise CorruptBlockError("truncated", f"size {size}")
        got, payload_checksum = _readinto_checked(reader, memoryview(self._payload(out)))
        if got < self.payload_nbytes:
            raise CorruptBlockError("truncated", "short payload")
        if f"{payload_checksum:016x}" != stored_checksum:
            raise CorruptBlockError("checksum")

    def decode(self, blob, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Verify a whole object held in memory; returns `out` (or a new tensor)."""
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(io.BytesIO(blob), len(blob), key, out)
        return out


def encoded_size(parts: Sequence) -> int:
    return sum(memoryview(p).nbytes for p in parts)
