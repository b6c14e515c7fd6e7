"""The daemon's configuration: one pydantic model for flags and `--config store.json`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, SecretStr, model_validator

from kvtier.policies import cache_policy_factory

from ..validation import ConfigError, validate

TOKEN_ENV = "KVTIER_STORE_TOKEN"
PERSISTENT_TYPES = ("fs", "obj")


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(5555, ge=0, le=65535)  # 0: any free port
    cpu_bytes: PositiveInt = 4 << 30  # the memory pool; nothing the daemon holds goes past it
    high_water: float = Field(0.9, gt=0, le=1)  # evict once the pool passes this share of cpu_bytes
    fs_path: str | None = None  # persistence: objects written through to files, reloaded on start
    fs_bytes: PositiveInt | None = None  # the fs tier's capacity (default: unbounded)
    fs_write_queue: PositiveInt = 256  # objects waiting to be persisted before writes are dropped
    # Further persistent tiers below fs_path, written through and read in order
    # on a miss: the tier specs of --kv-transfer-config, of type fs or obj.
    secondary_tiers: list[dict[str, Any]] = Field(default_factory=list)
    eviction_policy: str = "lru"
    token: SecretStr | None = None  # every request must carry it (also token_file, $KVTIER_STORE_TOKEN)
    token_file: str | None = None
    namespace_quotas: dict[str, PositiveInt] = Field(default_factory=dict)  # bytes, per key namespace
    metrics_port: NonNegativeInt | None = None  # Prometheus /metrics and /health over HTTP (0: any free port)
    max_object_bytes: PositiveInt = 256 << 20  # one payload frame; a larger one drops the connection
    max_request_bytes: PositiveInt = 1 << 30
    max_keys: PositiveInt = 4096  # per request
    max_header_bytes: PositiveInt = 4 << 20
    max_namespaces: PositiveInt = 1024  # namespaces tracked one by one in stats and metrics

    @model_validator(mode="after")
    def _checks(self):
        if self.token is not None and self.token_file:
            raise ValueError("give token or token_file, not both")
        if self.fs_bytes is not None and not self.fs_path:
            raise ValueError("fs_bytes needs fs_path")
        try:
            cache_policy_factory(self.eviction_policy)
        except (ValueError, KeyError) as error:
            raise ValueError(f"eviction_policy: {error}") from None
        self.persistent_specs()  # every secondary tier checked before anything starts
        return self

    def persistent_specs(self) -> list:
        """The secondary tiers' specs, validated: fs or obj (objects here are
        opaque and of any size; redis and store tiers need a block's size or
        are this daemon's own clients)."""
        from ..tiers import parse_tier_spec
        specs = []
        for i, raw in enumerate(self.secondary_tiers):
            try:
                spec = parse_tier_spec(raw)
            except ValueError as error:
                raise ValueError(f"secondary_tiers.{i}.{error}") from None
            if spec.type not in PERSISTENT_TYPES:
                raise ValueError(f"secondary_tiers.{i}.type: {spec.type!r} cannot hold the daemon's objects; "
                                 f"use one of {', '.join(PERSISTENT_TYPES)}")
            specs.append(spec)
        return specs

    def secret(self) -> str | None:
        """The token from the config, its file or the environment, or None."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as error:
                raise ConfigError(f"token_file: cannot read {self.token_file}: {error.strerror}",
                                  "token_file") from None
            if not token:
                raise ConfigError(f"token_file: {self.token_file} is empty", "token_file")
            return token
        return os.environ.get(TOKEN_ENV) or None


def load_store_config(config_file: str | None, overrides: dict) -> StoreConfig:
    """The config file's fields, then the flags given on the command line."""
    data: dict = {}
    if config_file:
        import json
        try:
            data = json.loads(Path(config_file).read_text())
        except OSError as error:
            raise ConfigError(f"--config: cannot read {config_file}: {error.strerror}") from None
        except ValueError as error:
            raise ConfigError(f"--config: {config_file} is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {config_file} must hold a JSON object")
    data.update({key: value for key, value in overrides.items() if value is not None})
    return validate(StoreConfig, data)
