"""Engine configuration: one pydantic model, validated once at the edge."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvtier.engine.model.loader import DEFAULT_MODEL_NAME


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = DEFAULT_MODEL_NAME
    served_model_name: list[str] | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # The KV cache's own dtype, in the device pool and in every tier ("auto": the
    # model's). A 16-bit cache halves the bytes; only float32 equals HF bit for bit.
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = 0
    max_model_len: int | None = Field(None, ge=16)
    block_size: int = Field(16, ge=1, le=1024)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    num_gpu_blocks_override: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    # On the CPU there is no device memory to take a fraction of: the pool is
    # capped at this many bytes of host memory (times gpu_memory_utilization).
    cpu_kv_cache_bytes: int = Field(2 << 30, ge=1 << 20)
    enable_prefix_caching: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: swap when the KV connector has a CPU tier to keep a victim's KV in, else recompute.
    preemption_mode: Literal["swap", "recompute"] | None = None
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # vLLM's partial-prefill knobs. A prefill with more than the threshold to go
    # computes at most that many tokens a step, and only max_long_partial_prefills
    # such (of max_num_partial_prefills unfinished prefills) run in one step;
    # decodes and short prefills go first. 0: off.
    long_prefill_token_threshold: int = Field(0, ge=0)
    max_num_partial_prefills: int = Field(1, ge=1)
    max_long_partial_prefills: int = Field(1, ge=1)
    kv_transfer_config: Any = None  # connectors.config.KVTransferConfig
    kv_events_config: Any = None  # connectors.kv_events.KVEventsConfig

    @field_validator("kv_transfer_config", mode="before")
    @classmethod
    def _parse_kv_transfer_config(cls, value: Any):
        from kvtier.connectors.config import parse_kv_transfer_config
        return parse_kv_transfer_config(value)

    @field_validator("kv_events_config", mode="before")
    @classmethod
    def _parse_kv_events_config(cls, value: Any):
        import json

        from kvtier.connectors.kv_events import KVEventsConfig
        from kvtier.kvstore.validation import ConfigError, validate
        if value is None or isinstance(value, KVEventsConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"kv_events_config: invalid JSON: {e}") from None
        return validate(KVEventsConfig, value, ("kv_events_config",))

    @model_validator(mode="after")
    def _check(self):
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be >= block_size")
        if self.max_long_partial_prefills > self.max_num_partial_prefills:
            raise ValueError("max_long_partial_prefills must be <= max_num_partial_prefills")
        return self

    @property
    def served_names(self) -> list[str]:
        return self.served_model_name or []
