"""Build a tier from its JSON spec by `type`: "cpu", "fs", "obj", "redis".

Specs are validated with pydantic; a bad one raises a ValidationError (a
ValueError) that names the offending field.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, PositiveInt, TypeAdapter

from .base import Tier
from .cpu import CpuTier
from .fs import FsSpec
from .obj import ObjSpec
from .redis import RedisSpec
from .spec import TierContext, TierSpec


class CpuSpec(TierSpec):
    type: Literal["cpu"] = "cpu"
    max_bytes: PositiveInt

    def build(self, ctx: TierContext) -> CpuTier:
        return CpuTier(self.name or self.type, ctx.codec.shape, ctx.codec.dtype, self.max_bytes,
                       ctx.policy_factory(self.eviction_policy), health=self.health())


AnyTierSpec = Annotated[Union[CpuSpec, FsSpec, ObjSpec, RedisSpec], Field(discriminator="type")]
_ADAPTER = TypeAdapter(AnyTierSpec)


def parse_tier_spec(spec: dict | TierSpec) -> TierSpec:
    return spec if isinstance(spec, TierSpec) else _ADAPTER.validate_python(spec)


def build_tier(spec: dict | TierSpec, ctx: TierContext) -> Tier:
    return parse_tier_spec(spec).build(ctx)
