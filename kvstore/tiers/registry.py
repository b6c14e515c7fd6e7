"""Build a tier from its JSON spec by `type`: "cpu", "fs", "obj", "redis", "store", or
an out-of-tree tier named by `module_path` (as vLLM loads one).

Specs are validated with pydantic; a bad one raises a ConfigError (a
ValueError) that names the offending field and, for an unknown key, the
closest known one.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, PositiveInt

from kvtier.policies.loading import load_object

from ..validation import ConfigError, validate
from .base import Tier
from .cpu import CpuTier
from .fs import FsSpec
from .obj import ObjSpec
from .redis import RedisSpec
from .spec import TierContext, TierSpec
from .store import StoreSpec


class CpuSpec(TierSpec):
    type: Literal["cpu"] = "cpu"
    max_bytes: PositiveInt

    def build(self, ctx: TierContext) -> CpuTier:
        return CpuTier(self.name or self.type, ctx.codec.shape, ctx.codec.dtype, self.max_bytes,
                       ctx.policy_factory(self.eviction_policy), health=self.health())


AnyTierSpec = Annotated[Union[CpuSpec, FsSpec, ObjSpec, RedisSpec, StoreSpec], Field(discriminator="type")]
_BUILT_IN = {"cpu": CpuSpec, "fs": FsSpec, "obj": ObjSpec, "redis": RedisSpec, "store": StoreSpec}


class ExternalTierSpec(TierSpec):
    """An out-of-tree tier, as vLLM loads one: {"type": "MyTier", "module_path":
    "my.module", ...}. `MyTier` is a TierSpec subclass (validated with the rest
    of the keys, then built), or a callable taking the TierContext and the rest
    of the keys as keywords and returning a Tier."""

    model_config = ConfigDict(extra="allow")
    type: str
    module_path: str

    def build(self, ctx: TierContext) -> Tier:
        target = load_object(self.module_path, self.type)
        options = {k: v for k, v in self.model_dump().items() if k not in ("type", "module_path")}
        if isinstance(target, type) and issubclass(target, TierSpec):
            return validate(target, {"type": self.type, **(self.model_extra or {})}).build(ctx)
        tier = target(ctx, **options)
        if not isinstance(tier, Tier):
            raise ConfigError(f"{self.module_path}.{self.type} returned {type(tier).__name__}, not a Tier", "type")
        return tier


def parse_tier_spec(spec: dict | TierSpec) -> TierSpec:
    """A tier spec from its JSON; a ConfigError (a ValueError) names the bad field."""
    if isinstance(spec, TierSpec):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"a tier is a JSON object, not {type(spec).__name__}")
    if spec.get("module_path"):
        return validate(ExternalTierSpec, spec)
    kind = spec.get("type")
    if kind not in _BUILT_IN:
        raise ConfigError(f"type: unknown tier type {kind!r}; built in: {', '.join(_BUILT_IN)} "
                          "(or give module_path for your own)", "type")
    return validate(_BUILT_IN[kind], spec)


def build_tier(spec: dict | TierSpec, ctx: TierContext) -> Tier:
    return parse_tier_spec(spec).build(ctx)
