"""Plain helpers shared by the kvstore tests: blocks, keys, tier contexts."""
from __future__ import annotations

import uuid

import torch

from kvtier.kvstore import make_key
from kvtier.kvstore.block_format import BlockCodec
from kvtier.kvstore.tiers import TierContext
from kvtier.policies import cache_policy_factory, make_cache_policy

SHAPE = (2, 2, 8, 2, 4)  # layers, K/V, tokens, heads, head_dim: small and fast
FINGERPRINT = "model-a"
SECONDARY_KINDS = ["fs", "redis", "s3", "gcs", "store"]  # s3: moto's server; gcs: fake-gcs-server; store: kvtier store
ALL_KINDS = ["cpu", *SECONDARY_KINDS]


def random_blocks(n: int, dtype=torch.float32, shape=SHAPE) -> torch.Tensor:
    blocks = torch.randn((n, *shape)).to(dtype)
    # Bits matter, not values: -0.0 and NaN must come back as they went.
    blocks.view(-1)[0] = -0.0
    blocks.view(-1)[1] = float("nan")
    return blocks


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def block_keys(n: int, namespace: str | None = None, fingerprint: str = FINGERPRINT) -> list[str]:
    namespace = namespace or uuid.uuid4().hex[:8]
    return [make_key(namespace, fingerprint, "L", i.to_bytes(4, "big")) for i in range(n)]


def tier_context(dtype=torch.float32, fingerprint=FINGERPRINT, shape=SHAPE, policy="lru") -> TierContext:
    default = cache_policy_factory(policy)
    return TierContext(BlockCodec(fingerprint, dtype, shape),
                       lambda name: default() if name is None else make_cache_policy(name))
