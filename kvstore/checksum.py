"""The payload checksum: XXH3-64, at memory speed and without a copy.

Measured here on 1 MiB (in cache) and 12 MB buffers: XXH3-64 53-55 GB/s,
hardware CRC-32C (google-crc32c) 18-21 GB/s, zlib.crc32 2.5 GB/s. A reader
verifies every byte it hands up, so the checksum sits on the fs tier's read
path next to a page-cache copy of ~14 GB/s: with CRC-32C it cost a third of
the tier's read bandwidth. xxhash releases the GIL on large buffers, so I/O
threads check blocks side by side.
"""
from __future__ import annotations

import xxhash


def checksum(data) -> int:
    """XXH3-64 of any C-contiguous buffer (bytes, memoryview, numpy array)."""
    return xxhash.xxh3_64_intdigest(data)


def running_checksum():
    """An object with update(buffer) and intdigest(): the checksum of everything
    given to it, equal to checksum() of the concatenation."""
    return xxhash.xxh3_64()
