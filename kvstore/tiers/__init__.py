"""Tiers: one interface (base.Tier), one small module per kind."""
from .base import Health, Tier, TierStats
from .blob import BlobBackend, BlobTier
from .cpu import CpuTier
from .registry import AnyTierSpec, CpuSpec, build_tier, parse_tier_spec
from .spec import TierContext, TierSpec

__all__ = [
    "AnyTierSpec", "BlobBackend", "BlobTier", "CpuSpec", "CpuTier", "Health", "Tier", "TierContext",
    "TierSpec", "TierStats", "build_tier", "parse_tier_spec",
]
