"""`kv_connector_extra_config` of the OffloadingConnector: every key of vLLM's
(with vLLM's meaning; a few are accepted and have nothing to act on here, see
the README's table), plus kvtier's own."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from kvtier.kvstore.tiers import parse_tier_spec
from kvtier.kvstore.validation import ConfigError, validate

BUILT_IN_SPECS = ("CPUOffloadingSpec", "TieringOffloadingSpec")
WHERE = ("kv_transfer_config", "kv_connector_extra_config")


class OffloadingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # -- vLLM's keys ---------------------------------------------------------
    spec_name: str = "CPUOffloadingSpec"
    spec_module_path: str | None = None  # where a spec_name that is not built in comes from
    cpu_bytes_to_use: int = Field(1 << 30, gt=0)
    num_cpu_blocks: PositiveInt | None = None  # vLLM's older sizing knob; wins when given
    block_size: PositiveInt | None = None  # offload block, tokens (a multiple of the engine block size)
    blocks_per_chunk: PositiveInt | None = None  # ... or counted in engine blocks
    eviction_policy: str = "lru"
    cache_policy_module_path: str | None = None
    # Store a block once it was offered this many times; 0 and 1 store at once.
    store_threshold: NonNegativeInt = 0
    max_tracker_size: PositiveInt = 64000  # blocks whose offers store_threshold counts
    offload_prompt_only: bool = True  # blocks made while decoding are not stored
    self_describing_kv_events: bool = False  # tier events carry token ids and parent hashes
    secondary_tiers: list[dict[str, Any]] = Field(default_factory=list)
    # vLLM's, with nothing to act on in kvtier: no tier-poll thread (tiers
    # report as they finish), stores dropped on a full queue rather than by a
    # detector, loads never run inside a step, one process owns the whole pool.
    tier_poll_interval_s: float | None = None
    backpressure: dict[str, Any] | None = None
    sync_load_budget_bytes: NonNegativeInt | None = None
    canonical_layout: bool | None = None

    # -- kvtier's --------------------------------------------------------------
    write_mode: Literal["write_through", "write_back"] = "write_through"
    namespace: str = "default"
    request_policy: str = "default"
    request_policy_module_path: str | None = None
    request_policy_config: dict[str, Any] = Field(default_factory=dict)
    # A tier load (or lookup) not done by then is given up: the request
    # recomputes those tokens, or fails under kv_load_failure_policy=fail.
    load_timeout_s: PositiveFloat = 10.0
    # Share of the CPU tier that preempted requests' swapped KV may pin (past
    # it the oldest victims give theirs up and recompute).
    swap_space_fraction: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.spec_name not in BUILT_IN_SPECS and not self.spec_module_path:
            raise ValueError(f"spec_name: {self.spec_name!r} is not one of {', '.join(BUILT_IN_SPECS)}; "
                             "give spec_module_path for your own")
        if self.secondary_tiers and self.spec_name == "CPUOffloadingSpec":
            raise ValueError("spec_name: secondary_tiers need 'TieringOffloadingSpec'")
        if self.block_size and self.blocks_per_chunk:
            raise ValueError("block_size: give block_size or blocks_per_chunk, not both")
        return self

    def offload_tokens(self, engine_block_size: int) -> int:
        if self.blocks_per_chunk:
            return self.blocks_per_chunk * engine_block_size
        return self.block_size or max(engine_block_size, (256 // engine_block_size) * engine_block_size)


def parse_offloading_config(extra: dict) -> OffloadingConfig:
    """The extra config, and every secondary tier in it, validated: a
    ConfigError names the bad field."""
    cfg = validate(OffloadingConfig, extra, WHERE)
    for i, tier in enumerate(cfg.secondary_tiers):
        try:
            parse_tier_spec(tier)
        except ValueError as e:
            where = f"{'.'.join(WHERE)}.secondary_tiers.{i}"
            raise ConfigError(f"{where}.{e}", f"{where}.{getattr(e, 'field', None) or ''}".rstrip(".")) from None
    return cfg
