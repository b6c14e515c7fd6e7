"""The engine behind the server: the step loop runs on its own thread and hands
outputs to asyncio consumers; no coroutine ever waits on a model step."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

logger = logging.getLogger("kvtier.engine")


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="kvtier-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        added = loop.create_future()
        with self._lock:
            self._streams[request_id] = (loop, q)
        self._commands.put(("add", (request_id, prompt, sampling_params, cache_salt), added, loop))
        try:
            await added  # raises the engine's RequestError before anything is yielded
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            with self._lock:
                live = self._streams.pop(request_id, None) is not None
            if live:  # the consumer left early (client went away): stop the work
                self._commands.put(("abort", request_id, None, None))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None, None))

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None, None, None))
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # -- the engine thread -------------------------------------------------
    def _apply(self, cmd) -> None:
        kind, arg, fut, loop = cmd
        if kind == "add":
            try:
                self.engine.add_request(*arg)
            except Exception as e:  # surfaces to the caller of generate()
                loop.call_soon_threadsafe(_settle, fut, e)
                with self._lock:
                    self._streams.pop(arg[0], None)
            else:
                loop.call_soon_threadsafe(_settle, fut, None)
        elif kind == "abort":
            self.engine.abort_request(arg)

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
            except Exception as e:  # a bug must not wedge every client: fail what is in flight
                logger.exception("engine step failed")
                self._fail_all(e)
                continue
            self._stats = self.engine.stats()
            for out in outputs:
                with self._lock:
                    target = self._streams.get(out.request_id)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
                if target:
                    target[0].call_soon_threadsafe(target[1].put_nowait, out)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for rid, (loop, q) in streams.items():
            self.engine.abort_request(rid)
            loop.call_soon_threadsafe(q.put_nowait, RuntimeError(f"engine error: {error}"))


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
