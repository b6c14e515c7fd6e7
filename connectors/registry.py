"""Connector names to classes; a user's class comes from kv_connector_module_path."""
from __future__ import annotations

import importlib

from kvtier.connectors.base import KVConnectorBase, KVLayout
from kvtier.connectors.config import KNOWN_CONNECTORS, KVTransferConfig
from kvtier.kvstore.validation import ConfigError

# name -> "module:Class", imported on first use so that an unused connector's
# dependencies are never loaded.
_BUILTIN = {
    "OffloadingConnector": "kvtier.connectors.offloading:OffloadingConnector",
    "MultiConnector": "kvtier.connectors.multi:MultiConnector",
}
KNOWN_CONNECTORS.update(_BUILTIN)


def register_connector(name: str, target: str) -> None:
    _BUILTIN[name] = target
    KNOWN_CONNECTORS.add(name)


def connector_class(config: KVTransferConfig) -> type[KVConnectorBase]:
    name = config.kv_connector
    if config.kv_connector_module_path:
        try:
            module = importlib.import_module(config.kv_connector_module_path)
        except ImportError as e:
            raise ConfigError(f"kv_transfer_config.kv_connector_module_path: cannot import "
                              f"{config.kv_connector_module_path!r}: {e}", "kv_connector_module_path") from None
        cls = getattr(module, name, None)
        if cls is None:
            raise ConfigError(f"kv_transfer_config.kv_connector: module {config.kv_connector_module_path!r} "
                             f"has no class {name!r}")
    elif name in _BUILTIN:
        module_name, cls_name = _BUILTIN[name].split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
    else:
        raise ConfigError(f"kv_transfer_config.kv_connector: unknown connector {name!r}; known: "
                         f"{', '.join(sorted(_BUILTIN))} (or set kv_connector_module_path)")
    if not (isinstance(cls, type) and issubclass(cls, KVConnectorBase)):
        raise ConfigError(f"kv_transfer_config.kv_connector: {name!r} is not a KVConnectorBase subclass")
    return cls


def create_connector(config: KVTransferConfig, layout: KVLayout) -> KVConnectorBase:
    return connector_class(config)(config, layout)
