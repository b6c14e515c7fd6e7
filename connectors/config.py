"""`--kv-transfer-config`: vLLM's KVTransferConfig, so that a config written
for vLLM parses here unchanged."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kvtier.kvstore.validation import ConfigError, validate

KVRole = Literal["kv_producer", "kv_consumer", "kv_both"]

# Connector names the connector registry knows; the registry adds to this set
# when it registers a connector, so that names can be checked at parse time.
KNOWN_CONNECTORS: set[str] = set()


class KVTransferConfig(BaseModel):
    # An unknown top-level key is almost always a typo (e.g. "kv_connecter"),
    # and silently ignoring it would drop the user's intent.
    model_config = ConfigDict(extra="forbid")

    kv_connector: str | None = None
    engine_id: str | None = None
    kv_role: KVRole | None = Field(None, validate_default=True)
    kv_connector_extra_config: dict[str, Any] = Field(default_factory=dict)
    kv_connector_module_path: str | None = None
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    # Accepted for compatibility with vLLM configs; the point-to-point
    # transports they describe do not exist here.
    kv_buffer_device: str = "cuda"
    kv_buffer_size: float = 1e9
    kv_rank: int | None = None
    kv_parallel_size: int = 1
    kv_ip: str = "127.0.0.1"
    kv_port: int = 14579
    enable_permute_local_kv: bool = False

    @field_validator("kv_role")
    @classmethod
    def _role_required_with_connector(cls, role: str | None, info: ValidationInfo) -> str | None:
        if role is None and info.data.get("kv_connector") is not None:
            raise ValueError("must be set when kv_connector is set ('kv_producer', 'kv_consumer' or 'kv_both')")
        return role

    @model_validator(mode="after")
    def _default_engine_id(self) -> "KVTransferConfig":
        if self.engine_id is None:
            self.engine_id = str(uuid.uuid4())  # as vLLM: one id per engine instance
        return self

    @property
    def is_kv_producer(self) -> bool:
        return self.kv_connector is not None and self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_kv_consumer(self) -> bool:
        return self.kv_connector is not None and self.kv_role in ("kv_consumer", "kv_both")

    def get_from_extra_config(self, key: str, default: Any = None) -> Any:
        return self.kv_connector_extra_config.get(key, default)


def parse_kv_transfer_config(value: str | dict | KVTransferConfig | None,
                             check_connector: bool = True) -> KVTransferConfig | None:
    """Inline JSON, `@path/to/file.json`, a dict or a ready config.

    With `check_connector`, the connector is found and its own extra config
    checked too (for the connectors that know theirs), so that every mistake
    stops start-up before a model loads.
    Raises ConfigError (a ValueError) whose message names the offending field."""
    if value is None or isinstance(value, KVTransferConfig):
        return value
    if isinstance(value, str):
        value = _load_json(value)
    if not isinstance(value, dict):
        raise ConfigError(f"kv_transfer_config: expected a JSON object, got {type(value).__name__}")
    config = validate(KVTransferConfig, value, ("kv_transfer_config",))
    if check_connector and config.kv_connector is not None:
        from kvtier.connectors.registry import connector_class
        connector_class(config).validate_config(config)
    return config


def _load_json(text: str) -> Any:
    where = ""
    if text.startswith("@"):
        path = text[1:]
        where = f" in {path}"
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"kv_transfer_config: cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"kv_transfer_config: invalid JSON{where}: {e}") from None
