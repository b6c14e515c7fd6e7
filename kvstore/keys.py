"""Names of stored blocks: namespace / model fingerprint / layout / block hash.

One name serves as a file path, an S3 or GCS object name and a Redis key, so
every segment is cut down to [A-Za-z0-9._-] and none is empty or starts with
a dot (no '.', '..' or hidden names; the fs tier's temp files start with one).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_SEGMENT = 120  # well under the 255-byte file name limit


def safe_segment(text: str) -> str:
    segment = _UNSAFE.sub("_", text)
    if segment.startswith("."):
        segment = "_" + segment[1:]
    if len(segment) > _MAX_SEGMENT:
        # Keep long names apart: a readable head plus a digest of the whole.
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        segment = f"{segment[:_MAX_SEGMENT - 17]}-{digest}"
    return segment or "_"


def make_key(namespace: str, model_fingerprint: str, layout: str, block_hash: bytes | str) -> str:
    if isinstance(block_hash, (bytes, bytearray, memoryview)):
        block_hash = bytes(block_hash).hex()
    parts = (namespace or "default", model_fingerprint, layout, block_hash)
    return "/".join(safe_segment(str(part)) for part in parts)


def dtype_name(dtype) -> str:
    """'float16' for torch.float16, numpy.float16 or the string itself."""
    return str(getattr(dtype, "name", None) or dtype).removeprefix("torch.")


def layout_id(dtype, block_size_tokens: int, group_index: int, shape: Sequence[int],
              format_version: int | None = None) -> str:
    """Everything that gives a block's bytes their meaning besides the model:
    the block-format version, dtype, tokens, KV cache group and shape. Another
    release's or layout's objects then live under other names: a plain miss."""
    from .block_format import FORMAT_VERSION

    dims = "x".join(str(int(d)) for d in shape)
    version = FORMAT_VERSION if format_version is None else format_version
    return safe_segment(f"v{version}-{dtype_name(dtype)}-t{block_size_tokens}-g{group_index}-{dims}")
