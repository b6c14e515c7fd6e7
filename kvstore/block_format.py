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
"""
from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence

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


class CorruptBlockError(Exception):
    """A stored object that must not be used; `reason` says why:
    truncated, magic, version, header, foreign or checksum."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _read_exact(reader, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


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

    def encode(self, key: str, tensor: torch.Tensor) -> list:
        """The object as buffers to write one after the other (header, payload)."""
        if tensor.dtype != self.dtype or tuple(tensor.shape) != self.shape:
            raise ValueError(f"block {tuple(tensor.shape)} {tensor.dtype} is not {self.shape} {self.dtype}")
        payload = byte_view(tensor)
        header = self._header(key, checksum(payload))
        return [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), checksum(header)) + header, payload]

    def encoded_size(self, key: str) -> int:
        """Size of the stored object for `key`, known before its checksum."""
        return _PREFIX.size + len(self._header(key, 0)) + self.payload_nbytes

    def _header(self, key: str, payload_checksum: int) -> bytes:
        # A fixed-width checksum keeps the size computable ahead of the write.
        header = json.dumps({"key": key, **self._expected, "checksum": f"{payload_checksum:016x}"}).encode()
        return header + b" " * (-(_PREFIX.size + len(header)) % _ALIGN)

    def read_into(self, reader, size: int, key: str, out: torch.Tensor) -> None:
        """Read one object of `size` bytes from `reader` (read/readinto) into `out`."""
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
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise CorruptBlockError("header", str(e)) from None
        if not isinstance(header, dict) or not isinstance(header.get("checksum"), str):
            raise CorruptBlockError("header", "not a block header")
        if header.get("key") != key or any(header.get(k) != v for k, v in self._expected.items()):
            raise CorruptBlockError("foreign", f"{header.get('key')} {header.get('fingerprint')}")
        if size != header_end + self.payload_nbytes:
            raise CorruptBlockError("truncated", f"size {size}")
        got, payload_checksum = _readinto_checked(reader, memoryview(byte_view(out)))
        if got < self.payload_nbytes:
            raise CorruptBlockError("truncated", "short payload")
        if f"{payload_checksum:016x}" != header["checksum"]:
            raise CorruptBlockError("checksum")

    def decode(self, blob, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Verify a whole object held in memory; returns `out` (or a new tensor)."""
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(io.BytesIO(blob), len(blob), key, out)
        return out


def encoded_size(parts: Sequence) -> int:
    return sum(memoryview(p).nbytes for p in parts)
