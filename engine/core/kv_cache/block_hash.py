"""Chained block hashes: identical in every process and on every replica."""
from __future__ import annotations

import hashlib
from array import array

ROOT_HASH = b"\x00" * 32


def hash_block(parent: bytes, token_ids: list[int], extra_keys: bytes = b"") -> bytes:
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(b"\x01")
        h.update(extra_keys)
    return h.digest()


def salt_keys(cache_salt: str | None) -> bytes:
    return cache_salt.encode() if cache_salt else b""


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, cache_salt: str | None) -> None:
    """Append hashes for every block of `token_ids` that became full."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else ROOT_HASH
        # The salt goes into the first block only: every later hash chains from it.
        extra = salt_keys(cache_salt) if i == 0 else b""
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra))
