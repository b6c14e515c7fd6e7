"""`kv_connector_extra_config` of the OffloadingConnector: vLLM's keys, plus ours."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator


class OffloadingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec_name: Literal["CPUOffloadingSpec", "TieringOffloadingSpec"] = "CPUOffloadingSpec"
    spec_module_path: str | None = None  # vLLM's; only the built-in specs exist here
    cpu_bytes_to_use: int = Field(1 << 30, gt=0)
    num_cpu_blocks: int | None = Field(None, gt=0)  # vLLM's older sizing knob; wins when given
    block_size: int | None = Field(None, gt=0)  # offload block, tokens
    eviction_policy: str = "lru"
    cache_policy_module_path: str | None = None
    store_threshold: int = Field(1, ge=1)
    offload_prompt_only: bool = False
    secondary_tiers: list[dict[str, Any]] = Field(default_factory=list)
    write_mode: Literal["write_through", "write_back"] = "write_through"
    namespace: str = "default"
    request_policy: str = "default"
    request_policy_module_path: str | None = None
    request_policy_config: dict[str, Any] = Field(default_factory=dict)
    load_workers: int = Field(2, ge=1)
    # A tier load (or lookup) not done by then is given up: the request
    # recomputes those tokens, or fails under kv_load_failure_policy=fail.
    load_timeout_s: PositiveFloat = 10.0

    @model_validator(mode="after")
    def _tiers_need_tiering(self):
        if self.secondary_tiers and self.spec_name != "TieringOffloadingSpec":
            raise ValueError("spec_name: secondary_tiers need 'TieringOffloadingSpec'")
        if self.spec_module_path:
            raise ValueError("spec_module_path: only the built-in specs are available")
        return self


def parse_extra_config(extra: dict, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(extra)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in ("kv_transfer_config", "kv_connector_extra_config", *err["loc"]))
        raise ValueError(f"{where}: {err['msg']}") from None
