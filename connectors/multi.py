"""MultiConnector: several connectors behind one. A hit loads from the first
connector that has it; every connector saves.

    {"kv_connector": "MultiConnector", "kv_role": "kv_both",
     "kv_connector_extra_config": {"connectors": [{"kv_connector": ..., ...}, ...]}}
"""
from __future__ import annotations

from dataclasses import dataclass

from kvtier.connectors.base import (
    ConnectorMetadata,
    ConnectorRequest,
    FinishedTransfers,
    KVConnectorBase,
    KVLayout,
    StepPlan,
)
from kvtier.connectors.config import KVTransferConfig, parse_kv_transfer_config
from kvtier.kvstore.validation import ConfigError


@dataclass
class MultiMetadata(ConnectorMetadata):
    parts: list[ConnectorMetadata]


class MultiConnector(KVConnectorBase):
    @classmethod
    def sub_configs(cls, config: KVTransferConfig) -> list[KVTransferConfig]:
        """Each connector's config, checked, with the parent's role and failure policy as defaults."""
        where = "kv_transfer_config.kv_connector_extra_config.connectors"
        specs = config.kv_connector_extra_config.get("connectors")
        if not isinstance(specs, list) or not specs:
            raise ConfigError(f"{where}: a non-empty list of connector configs is required", where)
        subs = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise ConfigError(f"{where}.{i}: expected an object", f"{where}.{i}")
            spec = {"kv_role": config.kv_role, "kv_load_failure_policy": config.kv_load_failure_policy, **spec}
            try:
                subs.append(parse_kv_transfer_config(spec))
            except ValueError as e:
                raise ConfigError(str(e).replace("kv_transfer_config.", f"{where}.{i}.", 1)) from None
        return subs

    @classmethod
    def validate_config(cls, config: KVTransferConfig) -> None:
        cls.sub_configs(config)

    def __init__(self, config: KVTransferConfig, layout: KVLayout):
        super().__init__(config, layout)
        from kvtier.connectors.registry import create_connector
        self.connectors: list[KVConnectorBase] = [create_connector(sub, layout) for sub in self.sub_configs(config)]
        for connector in self.connectors:  # one signal: any connector's progress wakes the engine
            connector.progress = self.progress
        self._chosen: dict[str, int] = {}   # request -> the connector its hit loads from
        self._holding: dict[str, set[int]] = {}  # request -> connectors still reading its blocks

    def get_num_new_matched_tokens(self, request: ConnectorRequest,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        for i, c in enumerate(self.connectors):
            tokens, is_async = c.get_num_new_matched_tokens(request, num_computed_tokens)
            if tokens is None:
                return None, False  # the first that may have it has not answered yet
            if tokens > 0:
                self._chosen[request.request_id] = i
                return tokens, is_async
        self._chosen.pop(request.request_id, None)
        return 0, False

    def update_state_after_alloc(self, request: ConnectorRequest, block_ids: list[list[int]],
                                 num_external_tokens: int) -> None:
        chosen = self._chosen.get(request.request_id)
        for i, c in enumerate(self.connectors):
            c.update_state_after_alloc(request, block_ids, num_external_tokens if i == chosen else 0)

    def build_connector_meta(self, plan: StepPlan) -> MultiMetadata:
        return MultiMetadata([c.build_connector_meta(plan) for c in self.connectors])

    def request_priority(self, request: ConnectorRequest) -> int | None:
        return next((p for c in self.connectors if (p := c.request_priority(request)) is not None), None)

    # -- swapping: the first connector that can keeps every victim's KV --------
    @property
    def _swapper(self) -> KVConnectorBase | None:
        return next((c for c in self.connectors if c.can_swap), None)

    @property
    def can_swap(self) -> bool:
        return self._swapper is not None

    def swap_out(self, request: ConnectorRequest, block_ids: list[list[int]], start: int, end: int) -> int:
        return self._swapper.swap_out(request, block_ids, start, end) if self.can_swap else 0

    def swap_in(self, request: ConnectorRequest, block_ids: list[list[int]], start: int, end: int) -> int:
        return self._swapper.swap_in(request, block_ids, start, end) if self.can_swap else 0

    def drop_swap(self, request: ConnectorRequest) -> None:
        if self.can_swap:
            self._swapper.drop_swap(request)

    def request_finished(self, request: ConnectorRequest, block_ids: list[list[int]]) -> bool:
        self._chosen.pop(request.request_id, None)
        holding = {i for i, c in enumerate(self.connectors) if c.request_finished(request, block_ids)}
        if holding:
            self._holding[request.request_id] = holding
        return bool(holding)

    def enable_kv_events(self) -> None:
        for c in self.connectors:
            c.enable_kv_events()

    def take_events(self) -> list:
        return [e for c in self.connectors for e in c.take_events()]

    def register_kv_caches(self, kv_cache) -> None:
        super().register_kv_caches(kv_cache)
        for c in self.connectors:
            c.register_kv_caches(kv_cache)

    def start_load_kv(self, metadata: MultiMetadata) -> None:
        for c, m in zip(self.connectors, metadata.parts):
            c.start_load_kv(m)

    def wait_for_layer_load(self, layer: int) -> None:
        for c in self.connectors:
            c.wait_for_layer_load(layer)

    def save_kv_layer(self, layer: int, metadata: MultiMetadata) -> None:
        for c, m in zip(self.connectors, metadata.parts):
            c.save_kv_layer(layer, m)

    def wait_for_save(self, metadata: MultiMetadata) -> None:
        for c, m in zip(self.connectors, metadata.parts):
            c.wait_for_save(m)

    def take_finished(self, finished_req_ids: set[str]) -> FinishedTransfers:
        out = FinishedTransfers()
        for i, c in enumerate(self.connectors):
            part = c.take_finished(finished_req_ids)
            for rid, failed in part.loaded.items():
                out.loaded.setdefault(rid, set()).update(failed)
            out.unattributed_failed_blocks |= part.unattributed_failed_blocks
            for rid in part.sent:
                holding = self._holding.get(rid)
                if holding is not None:
                    holding.discard(i)
                    if not holding:
                        del self._holding[rid]
                        out.sent.add(rid)
        return out

    def stats(self) -> dict[str, dict[str, float]]:
        out = {}
        for i, c in enumerate(self.connectors):
            for tier, s in c.stats().items():
                out[f"{i}.{tier}" if len(self.connectors) > 1 else tier] = s
        return out

    def shutdown(self) -> None:
        for c in self.connectors:
            c.shutdown()
