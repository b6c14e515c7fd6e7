"""Bytes and where they live: block format, tiers, the tiered store."""
from .block_format import BlockCodec, CorruptBlockError
from .keys import layout_id, make_key
from .tiered_store import TieredStore
from .tiers import Tier, build_tier, parse_tier_spec

__all__ = [
    "BlockCodec", "CorruptBlockError", "TieredStore", "Tier", "build_tier", "layout_id", "make_key",
    "parse_tier_spec",
]
