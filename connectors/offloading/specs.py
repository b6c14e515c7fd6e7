"""Offloading specs (vLLM's spec_name / spec_module_path): what builds the
connector's block store. The two built in are CPUOffloadingSpec (host memory
only) and TieringOffloadingSpec (host memory, then secondary tiers); a spec of
your own subclasses OffloadingSpec, lives in spec_module_path, and returns
any object with TieredStore's methods (lookup, contains, get_async,
put_async, flush, stats, close)."""
from __future__ import annotations

import torch

from kvtier.kvstore.tiered_store import TieredStore
from kvtier.policies.loading import load_object

from .config import OffloadingConfig


class OffloadingSpec:
    def __init__(self, config: OffloadingConfig) -> None:
        self.config = config

    def build_store(self, block_shape: tuple[int, ...], dtype: torch.dtype, cpu_bytes: int,
                    model_fingerprint: str, block_tokens: int):
        cfg = self.config
        return TieredStore(
            block_shape=block_shape, dtype=dtype, cpu_bytes=cpu_bytes, secondary_specs=cfg.secondary_tiers,
            model_fingerprint=model_fingerprint, eviction_policy=cfg.eviction_policy,
            cache_policy_module_path=cfg.cache_policy_module_path, write_mode=cfg.write_mode,
            block_tokens=block_tokens)


class CPUOffloadingSpec(OffloadingSpec):
    pass


class TieringOffloadingSpec(OffloadingSpec):
    pass


BUILT_IN = {"CPUOffloadingSpec": CPUOffloadingSpec, "TieringOffloadingSpec": TieringOffloadingSpec}


def make_spec(config: OffloadingConfig) -> OffloadingSpec:
    if config.spec_module_path:
        cls = load_object(config.spec_module_path, config.spec_name)
    else:
        cls = BUILT_IN[config.spec_name]
    if not (isinstance(cls, type) and issubclass(cls, OffloadingSpec)):
        raise ValueError(f"kv_transfer_config.kv_connector_extra_config.spec_name: {config.spec_name!r} "
                         "is not an OffloadingSpec")
    return cls(config)
