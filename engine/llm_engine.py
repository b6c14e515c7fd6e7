"""The synchronous engine core: add requests, step, collect outputs.

It wires the parts (platform.py picks the device and sizes the pool,
attention/selector.py picks the kernel, the connector comes from
connectors/) and runs the step: schedule, forward, sample, output."""
from __future__ import annotations

import logging

import torch

from kvtier.connectors.kv_events import make_publisher
from kvtier.engine.attention.selector import choose_attention
from kvtier.engine.config import EngineConfig
from kvtier.engine.core.kv_cache import KVCacheManager, build_kv_cache_groups
from kvtier.engine.core.outputs import RequestOutput
from kvtier.engine.core.request import Request, RequestStatus
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.core.scheduler import PrefillLimits, Scheduler
from kvtier.engine.core.stats import TTFT_BUCKETS, EngineStats, Histogram
from kvtier.engine.detokenizer import IncrementalDetokenizer
from kvtier.engine.errors import RequestError
from kvtier.engine.input_processor import InputProcessor
from kvtier.engine.model.causal_lm import CausalLM
from kvtier.engine.model.loader import LoadedModel, load_model
from kvtier.engine.model.runner import ModelRunner
from kvtier.engine.output_processor import OutputKind, RequestGroup
from kvtier.engine.platform import kv_pool_blocks, pick_device, pick_dtype, pick_kv_cache_dtype

logger = logging.getLogger("kvtier.engine")
# The longest an idle step waits for a tier lookup or load it was not told of:
# a connector that never signals progress is polled this often.
IDLE_WAIT_S = 0.01

class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.kv_cache_dtype = pick_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        torch.manual_seed(config.seed)
        self.loaded = loaded or load_model(config.model, self.dtype)
        cfg = self.loaded.config
        self.model_config = cfg
        self.tokenizer = self.loaded.tokenizer
        self.model_name = self.loaded.name
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.block_size = config.block_size
        self.groups = build_kv_cache_groups(cfg.layer_types, cfg.sliding_window)
        self.model = CausalLM(cfg, self.loaded.weights, self.device, self.dtype)
        if loaded is None:
            # The model holds what it needs (prepacked linears are copies): keeping
            # the loader's tensors too would double the weights' memory.
            self.loaded.weights.clear()
        self.num_blocks = kv_pool_blocks(config, cfg, self.groups, self.max_model_len, self.device,
                                       self.kv_cache_dtype)
        self.kv_cache_manager = KVCacheManager(self.groups, self.num_blocks, self.block_size,
                                               config.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.kv_cache_manager, self.num_blocks, self.block_size,
                                  self.kv_cache_dtype)
        self.connector = self._make_connector()
        self.kv_events = make_publisher(config.kv_events_config)
        if self.kv_events is not None:
            self.kv_cache_manager.enable_events()
            if self.connector is not None:
                self.connector.enable_kv_events()
        policy = config.kv_transfer_config.kv_load_failure_policy if self.connector else "recompute"
        self.input = InputProcessor(
            self.tokenizer, self.max_model_len, cfg.vocab_size,
            lambda tokens: self.kv_cache_manager.max_blocks_needed(tokens, config.max_num_batched_tokens),
            self.num_blocks - 1)
        self.preemption_mode = self._preemption_mode()
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, self.connector, policy, self.preemption_mode,
                                   config.scheduling_policy,
                                   PrefillLimits(config.long_prefill_token_threshold, config.max_num_partial_prefills,
                                                 config.max_long_partial_prefills))
        choose_attention(self.model, self.runner, self.device)
        self.requests: dict[str, RequestGroup] = {}
        self._child_to_group: dict[str, RequestGroup] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        logger.info("KV pool: %d blocks of %d tokens (%d groups) on %s, %s (model %s)", self.num_blocks,
                    self.block_size, len(self.groups), self.device, self.kv_cache_dtype, self.dtype)

    # -- set-up ------------------------------------------------------------
    def _make_connector(self):
        ktc = self.config.kv_transfer_config
        if ktc is None or ktc.kv_connector is None:
            return None
        from kvtier.connectors.base import KVGroupLayout, KVLayout
        from kvtier.connectors.registry import create_connector
        layout = KVLayout(
            block_size=self.block_size, page_shape=tuple(self.runner.kv_cache.shape[1:]), dtype=self.kv_cache_dtype,
            groups=tuple(KVGroupLayout(g.index, g.layers, getattr(g.spec, "window", None)) for g in self.groups),
            model_name=self.model_name, model_fingerprint=self.loaded.fingerprint)
        connector = create_connector(ktc, layout)
        connector.register_kv_caches(self.runner.kv_cache)
        self.model.connector = connector
        return connector

    def _preemption_mode(self) -> str:
        """Swap when the connector can keep a victim's KV (a CPU tier), else recompute."""
        can_swap = self.connector is not None and self.connector.can_swap
        mode = self.config.preemption_mode or ("swap" if can_swap else "recompute")
        if mode == "swap" and not can_swap:
            from kvtier.kvstore.validation import ConfigError
            raise ConfigError("preemption_mode (--preemption-mode): 'swap' keeps a preempted request's KV in the "
                              "KV connector's CPU tier, and there is none: give a --kv-transfer-config with the "
                              "OffloadingConnector, or --preemption-mode recompute", "preemption_mode")
        return mode

    # -- requests ----------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    cache_salt: str | None = None, output_kind: OutputKind = "cumulative",
                    prompt_text: str | None = None, priority: int = 0) -> None:
        """`prompt`: text, or token ids (then `prompt_text` may say what they were tokenized from)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        text, ids = self.input.tokenize(prompt)
        text = text if text is not None else prompt_text
        max_tokens = self.input.max_tokens(len(ids), params)
        eos = tuple(self.model_config.eos_token_ids)
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else (params.seed + i) % (1 << 64)  # a generator takes 64 bits
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(child_id, ids, params, max_tokens, self.block_size, cache_salt, seed, eos,
                                    priority))
        group = RequestGroup(request_id, text, ids, params, children,
                             [IncrementalDetokenizer(self.tokenizer, params) for _ in children], output_kind)
        self.requests[request_id] = group
        for child in children:
            self._child_to_group[child.request_id] = group
            self.scheduler.add(child)
        self.prompt_tokens_total += len(ids) * params.n

    def abort_request(self, request_id: str) -> None:
        group = self.requests.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            self._child_to_group.pop(child.request_id, None)
            if not child.is_finished:
                self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)

    def wake(self) -> None:
        """From any thread: a step waiting on the tiers returns now (a request arrived)."""
        if self.connector is not None:
            self.connector.progress.set()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        touched: dict[str, RequestGroup] = {}
        for req in sched.failed:  # a KV load failed under kv_load_failure_policy=fail
            group = self._child_to_group[req.request_id]
            touched[group.request_id] = group
        meta = None
        if self.connector is not None:
            # Built even for an empty step: the loads it starts are what an idle step waits on.
            meta = self.connector.build_connector_meta(self._step_plan(sched))
            self.connector.start_load_kv(meta)
            self.model.connector_meta = meta
        if not sched.scheduled:
            if self.scheduler.waiting_on_tiers and not touched:
                # Only tier lookups or loads in flight: wait for one to finish (or a
                # request to arrive), not spin steps that take the GIL from the transfers.
                self.connector.wait_for_progress(IDLE_WAIT_S)
            return self._finish_outputs(touched)
        tokens, logprobs = self.runner.execute(sched)
        if self.connector is not None:
            self.connector.wait_for_save(meta)
        self.scheduler.update_after_step(sched)
        sampled = [s.request for s in sched.scheduled if s.completes_prompt]
        for req, tok, lp in zip(sampled, tokens, logprobs):
            first = req.first_token_time is None
            req.append_token(tok, lp)
            if first:
                self.ttft.observe(req.first_token_time - req.arrival_time)
            self.generation_tokens_total += 1
            req.check_token_stop()
            group = self._child_to_group[req.request_id]
            group.on_token(req)
            if req.is_finished:
                self.scheduler.finish(req, req.status)
            touched[group.request_id] = group
        return self._finish_outputs(touched)

    def _step_plan(self, sched):
        from kvtier.connectors.base import ScheduledRequest, StepPlan
        kv = self.kv_cache_manager
        return StepPlan([ScheduledRequest(s.request, kv.block_ids(s.request.request_id),
                                          s.request.num_computed_tokens, s.num_new_tokens)
                         for s in sched.scheduled], sched.finished_req_ids)

    def _publish_events(self) -> None:
        events = self.kv_cache_manager.take_events()
        if self.connector is not None:
            events += self.connector.take_events()
        self.kv_events.publish(events)

    def _finish_outputs(self, touched: dict[str, RequestGroup]) -> list[RequestOutput]:
        if self.kv_events is not None:
            self._publish_events()
        outputs = [out for g in touched.values() if (out := g.output()) is not None]
        for g in touched.values():
            if g.finished:
                self.requests.pop(g.request_id, None)
                for c in g.children:
                    self._child_to_group.pop(c.request_id, None)
        return outputs

    def shutdown(self) -> None:
        """Stop the connector's background work (pending stores are flushed by it)."""
        if self.kv_events is not None:
            self._publish_events()
            self.kv_events.shutdown()
            self.kv_events = None
        if self.connector is not None:
            self.connector.shutdown()
            self.connector = self.model.connector = self.scheduler.connector = None

    # -- introspection -----------------------------------------------------
    def stats(self) -> EngineStats:
        kv = self.kv_cache_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries_total=kv.num_queries, prefix_cache_hits_total=kv.num_hits,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            preemption_swapped_out_blocks_total=self.scheduler.num_swapped_out_blocks_total,
            preemption_swapped_in_blocks_total=self.scheduler.num_swapped_in_blocks_total,
            preemption_swap_fallbacks_total=self.scheduler.num_swap_fallbacks_total,
            preemption_recomputed_tokens_total=self.scheduler.num_recomputed_tokens_total,
            restore=self.scheduler.restore_time.copy(),
            kv_cache_usage=kv.usage, kv_cache_usage_per_group=kv.usage_per_group(),
            ttft_buckets=list(self.ttft.buckets), ttft_bucket_counts=list(self.ttft.counts),
            ttft_sum=self.ttft.sum, ttft_count=self.ttft.count,
            tiers=self.connector.stats() if self.connector is not None else {})
