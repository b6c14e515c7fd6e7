"""The KV connector API, in the engine-neutral types of this package.

A connector moves KV blocks between the engine's device pool and somewhere else
(host memory, disk, object stores, another engine). The engine calls the
scheduler-side methods while it plans a step and the worker-side methods while
it runs one; in kvtier both sides live in one object. The shape follows vLLM's
KVConnectorBase_V1 so a connector written against it ports with little change.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvtier.connectors.config import KVTransferConfig


class ConnectorRequest(Protocol):
    """What a connector may read of a request (the engine's Request satisfies it)."""
    request_id: str
    prompt_token_ids: list[int]
    all_token_ids: list[int]
    block_hashes: list[bytes]  # chained, one per full device block, identical in every group
    cache_salt: str | None
    num_computed_tokens: int
    priority: int  # lower runs first
    num_preemptions: int

    @property
    def num_prompt_tokens(self) -> int: ...


@dataclass(frozen=True)
class KVGroupLayout:
    index: int
    layers: tuple[int, ...]
    sliding_window: int | None  # None: full attention

    def needed_from(self, boundary: int) -> int:
        """First token whose KV a query at position `boundary` attends to (HF's
        window: keys boundary-W+1 .. boundary). The engine's table holds the
        null block for every device block before it."""
        return 0 if self.sliding_window is None else max(0, boundary - self.sliding_window + 1)


@dataclass(frozen=True)
class KVLayout:
    """How the device pool is laid out: [num_blocks, *page_shape], one page a
    block of every layer of a group, so a group's KV for a block is contiguous."""
    block_size: int
    page_shape: tuple[int, ...]  # (layers_per_page, 2, block_size, kv_heads, head_dim)
    dtype: torch.dtype
    groups: tuple[KVGroupLayout, ...]
    model_name: str
    model_fingerprint: str


@dataclass
class ScheduledRequest:
    request: ConnectorRequest
    block_ids: list[list[int]]   # per group, after this step's allocation (0 = null block)
    num_computed_tokens: int     # before this step
    num_new_tokens: int


@dataclass
class StepPlan:
    """What the scheduler decided for one step, handed to build_connector_meta."""
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)


class ConnectorMetadata:
    """Opaque to the engine: passed from the scheduler side to the worker side."""


@dataclass
class FinishedTransfers:
    """What finished since the last step, handed over in one piece so that a
    load's failures always arrive with the load itself."""
    sent: set[str] = field(default_factory=set)  # requests whose held blocks may be freed
    # Requests whose loads ended -> device blocks that did not land (empty: all did).
    loaded: dict[str, set[int]] = field(default_factory=dict)
    # Failed device blocks not tied to a request (connectors written to vLLM's
    # two-call API): the scheduler matches them to the loading requests' tables.
    unattributed_failed_blocks: set[int] = field(default_factory=set)


class KVConnectorBase(ABC):
    @classmethod
    def validate_config(cls, config: KVTransferConfig) -> None:
        """Check `kv_connector_extra_config` before anything is built (raise a
        ConfigError naming the field); the default accepts whatever it holds."""

    def __init__(self, config: KVTransferConfig, layout: KVLayout):
        self.config = config
        self.layout = layout
        self.extra = dict(config.kv_connector_extra_config)
        # Set by the connector's own threads when a lookup or a load finishes (and by
        # the engine when a request arrives): what an idle engine waits on.
        self.progress = threading.Event()

    def wait_for_progress(self, timeout: float) -> None:
        """Block until `progress` is set or `timeout` passes: an engine with only
        lookups or loads in flight waits here rather than spinning steps that take
        the GIL from the threads doing the transfers. A connector that never sets
        `progress` is polled every `timeout`."""
        self.progress.wait(timeout)
        self.progress.clear()

    # -- scheduler side ----------------------------------------------------
    @abstractmethod
    def get_num_new_matched_tokens(self, request: ConnectorRequest,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond `num_computed_tokens` this connector can supply, and
        whether they arrive asynchronously (the request then waits for them).
        None: the answer is not known yet (a lookup is in flight); the scheduler
        asks again on a later step and runs other requests meanwhile. Must not
        wait on I/O."""

    @abstractmethod
    def update_state_after_alloc(self, request: ConnectorRequest, block_ids: list[list[int]],
                                 num_external_tokens: int) -> None:
        """Blocks were allocated for the hit: remember where the load must land."""

    @abstractmethod
    def build_connector_meta(self, plan: StepPlan) -> ConnectorMetadata:
        """Everything the worker side needs for this step (loads to start, blocks to save)."""

    def request_finished(self, request: ConnectorRequest, block_ids: list[list[int]]) -> bool:
        """Called once for every request that ends, however it ends (finished,
        aborted, failed, aborted mid-load): drop what is kept for it. True to
        keep its blocks until take_finished reports it sent. A load still in
        flight for it must still be reported by take_finished."""
        return False

    def request_priority(self, request: ConnectorRequest) -> int | None:
        """The priority the connector's request policy gives a new request (None: keep its own)."""
        return None

    # -- preemption by swapping (optional) -----------------------------------
    @property
    def can_swap(self) -> bool:
        """Keeps preempted requests' KV (swap_out / swap_in below)."""
        return False

    def swap_out(self, request: ConnectorRequest, block_ids: list[list[int]], start: int, end: int) -> int:
        """The scheduler is taking the request's device blocks from token `start`
        (a block boundary) on, and wants their KV up to `end` back later. Before
        this step's forward pass (start_load_kv) whatever of it the connector
        does not hold already is copied out of those blocks, and all of it is
        kept until swap_in, drop_swap or request_finished. Returns how many device
        blocks it keeps; 0 declines (the request recomputes them)."""
        return 0

    def swap_in(self, request: ConnectorRequest, block_ids: list[list[int]], start: int, end: int) -> int:
        """Load the KV swap_out kept for tokens start..end-1 into the request's
        new blocks, through the load path (take_finished reports it like any
        load). Returns the device blocks it fills; 0 when the copy is gone or
        does not cover every block the request holds there (it then recomputes)."""
        return 0

    def drop_swap(self, request: ConnectorRequest) -> None:
        """Forget what swap_out kept for the request (it recomputes instead)."""

    def enable_kv_events(self) -> None:
        """Start collecting KV cache events (kvtier.connectors.kv_events) for take_events."""

    def take_events(self) -> list:
        """KV cache events (blocks stored or removed in the connector's tiers) since the last call."""
        return []

    # -- worker side -------------------------------------------------------
    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache

    @abstractmethod
    def start_load_kv(self, metadata: ConnectorMetadata) -> None:
        """Start this step's loads; must not wait for them."""

    def wait_for_layer_load(self, layer: int) -> None:
        """Layer-wise connectors block here until `layer`'s KV is in place."""

    def save_kv_layer(self, layer: int, metadata: ConnectorMetadata) -> None:
        """Layer-wise connectors start saving `layer` here, right after it ran."""

    @abstractmethod
    def wait_for_save(self, metadata: ConnectorMetadata) -> None:
        """The forward pass is done: the step's new blocks may be read now. Must not
        hold the step loop for the store itself."""

    def take_finished(self, finished_req_ids: set[str]) -> FinishedTransfers:
        """Everything finished since the last call, in one hand-over: a load's
        failed blocks come with the load itself, never a step apart. This default
        serves connectors written to vLLM's two calls below; kvtier's own
        connectors report per request."""
        sent, received = self.get_finished(finished_req_ids)
        failed = self.get_block_ids_with_load_errors()
        return FinishedTransfers(set(sent), {rid: set() for rid in received}, set(failed))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """vLLM's call: (requests whose held blocks may be freed now, requests whose loads finished)."""
        return set(), set()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """vLLM's call: device blocks whose load failed since the last call."""
        return set()

    # -- introspection -----------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        """Per tier: lookup_tokens, hit_tokens, bytes_in, bytes_out, usage_bytes, errors, corrupt_blocks."""
        return {}

    def shutdown(self) -> None:
        pass
