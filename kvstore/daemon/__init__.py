"""`kvtier store`: the KV store daemon that many engine replicas share."""
from .config import StoreConfig, load_store_config
from .server import StoreServer

__all__ = ["StoreConfig", "StoreServer", "load_store_config"]
