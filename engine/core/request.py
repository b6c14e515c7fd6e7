"""One sequence being served: its tokens, progress and state."""
from __future__ import annotations

import enum
import time

import torch

from kvtier.engine.core.kv_cache.block_hash import extend_block_hashes
from kvtier.engine.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, block_size: int, cache_salt: str | None = None,
                 seed: int | None = None, eos_token_ids: tuple[int, ...] = (), priority: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.cache_salt = cache_salt
        self.eos_token_ids = eos_token_ids
        self.block_size = block_size
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.num_computed_tokens = 0
        self.num_external_tokens = 0  # being loaded by the KV connector
        self.skip_connector = False  # a load of it failed: it computes what is missing instead
        self.num_cached_tokens = -1  # set when first scheduled
        self.num_preemptions = 0
        self.priority = priority  # lower runs first (scheduling_policy=priority)
        self.arrival_seq = 0  # set by the scheduler: ties between equal priorities go by arrival
        self.swapped_upto = 0  # preempted with its KV from num_computed_tokens to here kept by the connector
        self.restore_started: float | None = None
        self.num_computed_peak = 0  # most tokens ever computed: what is computed again below it is recomputed
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.block_hashes: list[bytes] = []
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self.update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def update_block_hashes(self) -> None:
        extend_block_hashes(self.block_hashes, self.all_token_ids, self.block_size, self.cache_salt)

    def append_token(self, token_id: int, logprobs: dict[int, float] | None) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
            self.cumulative_logprob += logprobs.get(token_id, 0.0)
        self.last_token_time = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = self.last_token_time
        self.update_block_hashes()

    def check_token_stop(self) -> None:
        """Length and stop-token checks; stop strings are checked on text by the engine."""
        last = self.output_token_ids[-1]
        n = len(self.output_token_ids)
        if n >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, None
                return
            if last in self.params.stop_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
                return
        if n >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
