"""Fixtures for the kvstore tests: builders of tiers on fresh locations (a
directory, a bucket, a key prefix) of the real servers that tests/conftest.py
starts once per session (redis_srv, s3_srv, gcs_srv, store_srv)."""
from __future__ import annotations

import uuid

import pytest
import torch

from kvtier.kvstore.tiers import build_tier

from kv_helpers import FINGERPRINT, tier_context


@pytest.fixture
def spec_for(tmp_path, request):
    """spec_for(kind, **extra) -> the JSON spec of a tier of that kind on a fresh location."""

    def make(kind: str, **extra) -> dict:
        unique = uuid.uuid4().hex[:10]
        if kind == "cpu":
            return {"type": "cpu", "max_bytes": 1 << 20, **extra}
        if kind == "fs":
            return {"type": "fs", "path": str(tmp_path / f"fs-{unique}"), **extra}
        if kind == "redis":
            return {"type": "redis", "url": request.getfixturevalue("redis_srv").url,
                    "key_prefix": f"t{unique}:", **extra}
        if kind == "store":  # one daemon; keys of a fresh namespace each time
            return request.getfixturevalue("store_srv").tier_spec(**extra)
        if kind in ("s3", "gcs"):
            server = request.getfixturevalue(f"{kind}_srv")
            return server.tier_spec(server.create_bucket(f"b-{unique}"), **extra)
        raise ValueError(kind)

    return make


@pytest.fixture
def make_tier(spec_for):
    """make_tier(kind or spec, dtype=..., fingerprint=..., **extra) -> a tier, closed after the test."""
    built = []

    def make(kind_or_spec, dtype=torch.float32, fingerprint=FINGERPRINT, **extra):
        spec = spec_for(kind_or_spec, **extra) if isinstance(kind_or_spec, str) else kind_or_spec
        tier = build_tier(spec, tier_context(dtype, fingerprint))
        built.append(tier)
        return tier

    yield make
    for tier in built:
        tier.close()
