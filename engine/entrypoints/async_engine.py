"""The engine behind the server: the step loop runs on its own thread and hands
outputs to asyncio consumers; no coroutine ever waits on a model step.

Each request's stream holds the deltas its consumer has not read yet, merged
into one: a slow client costs at most what was generated for it. If the
engine thread ever dies, every stream ends with an error, new requests are
refused and is_healthy() says so.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.outputs import CompletionOutput, RequestOutput
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.core.stats import EngineStats
from kvtier.engine.llm_engine import LLMEngine

logger = logging.getLogger("kvtier.engine")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped: nothing more will be served."""


def merge_delta(pending: RequestOutput, new: RequestOutput) -> RequestOutput:
    """One delta covering `pending` then `new`."""
    choices = {c.index: c for c in pending.outputs}
    for c in new.outputs:
        old = choices.get(c.index)
        if old is None:
            choices[c.index] = c
            continue
        choices[c.index] = CompletionOutput(
            index=c.index, text=old.text + c.text, token_ids=old.token_ids + c.token_ids,
            cumulative_logprob=c.cumulative_logprob,
            logprobs=None if c.logprobs is None else (old.logprobs or []) + c.logprobs,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason, text_offset=old.text_offset)
    new.outputs = [choices[i] for i in sorted(choices)]
    return new


class _Stream:
    """What the engine made for one request that its consumer has not taken."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ready = asyncio.Event()  # set and waited on the loop's thread only
        self._lock = threading.Lock()
        self._pending: RequestOutput | BaseException | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the engine thread."""
        with self._lock:
            if isinstance(self._pending, RequestOutput) and isinstance(item, RequestOutput):
                item = merge_delta(self._pending, item)
            if not isinstance(self._pending, BaseException):
                self._pending = item
        self.loop.call_soon_threadsafe(self.ready.set)

    def take(self) -> RequestOutput | BaseException | None:
        with self._lock:
            item, self._pending = self._pending, None
        return item


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._closed = False  # no more requests: the engine thread is gone or going
        self._stats = engine.stats()
        self._tokenizers = ThreadPoolExecutor(2, thread_name_prefix="kvtier-tokenize")
        self._thread = threading.Thread(target=self._run, name="kvtier-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    async def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(text, token ids), checked, on the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizers, self.engine.input.tokenize, prompt)

    async def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A conversation's token ids through the chat template, on the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizers, self.engine.input.chat, messages)

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str,
                       cache_salt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Deltas: each output carries what is new since the previous one. A text
        prompt is tokenized here, not on the engine thread: a long one must not
        hold the other requests' steps."""
        text, ids = await self.tokenize(prompt)
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        added = loop.create_future()
        with self._lock:  # under the lock: _fail_all then sees the request, or we see it has run
            if self._closed:
                raise EngineDeadError("the engine has stopped")
            self._streams[request_id] = stream
            self._send(("add", (request_id, ids, sampling_params, cache_salt, "delta", text, priority), added, loop))
        try:
            await added  # raises the engine's RequestError before anything is yielded
            while True:
                await stream.ready.wait()
                stream.ready.clear()
                item = stream.take()
                if item is None:
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            with self._lock:
                live = self._streams.pop(request_id, None) is not None
            if live:  # the consumer left early (client went away): stop the work
                self._send(("abort", request_id, None, None))

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self.engine.wake()  # a step waiting on the tiers takes it now, not at its next poll

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id, None, None))

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self) -> None:
        self._stop.set()
        self._send(("wake", None, None, None))
        self._thread.join(timeout=10)
        self._tokenizers.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()

    # -- the engine thread -------------------------------------------------
    def _apply(self, cmd) -> None:
        kind, arg, fut, loop = cmd
        if kind == "add":
            try:
                self.engine.add_request(*arg)
            except Exception as e:  # a client's mistake: surfaces to the caller of generate()
                with self._lock:
                    self._streams.pop(arg[0], None)
                loop.call_soon_threadsafe(_settle, fut, e)
            else:
                loop.call_soon_threadsafe(_settle, fut, None)
        elif kind == "abort":
            self.engine.abort_request(arg)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # anything outside a step: nothing can be trusted to go on
            logger.exception("the engine thread died")
            self._dead = e
        finally:
            self._fail_all(EngineDeadError(f"the engine stopped: {self._dead!r}" if self._dead
                                           else "the engine was shut down"))

    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self.engine.has_unfinished_requests()
            try:
                self._apply(self._commands.get(timeout=0.5) if idle else self._commands.get_nowait())
                while True:
                    self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished_requests():
                self._stats = self.engine.stats()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug in one step must not wedge every client: fail what is in flight
                logger.exception("engine step failed")
                self._fail_in_flight(e)
                continue
            self._stats = self.engine.stats()
            for out in outputs:
                with self._lock:
                    stream = self._streams.get(out.request_id)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
                if stream is not None:
                    stream.put(out)

    def _fail_in_flight(self, error: Exception) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            self.engine.abort_request(rid)
            stream.put(RuntimeError(f"engine error: {error}"))

    def _fail_all(self, error: BaseException) -> None:
        """Every consumer, and every request still being added, gets `error`."""
        with self._lock:
            self._closed = True
            streams, self._streams = self._streams, {}
            commands = []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        for stream in streams.values():
            stream.put(error)
        for kind, _, fut, loop in commands:
            if kind == "add":
                loop.call_soon_threadsafe(_settle, fut, error)


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
