"""The `store` tier: blocks in a `kvtier store` daemon that many engine
replicas share (kvstore/daemon, protocol in docs/store-protocol.md).

    {"type": "store", "url": "kvtier://host:5555", "token": "..."}

The daemon holds opaque objects; this side encodes and verifies them (a
damaged or foreign object is a miss here). Each calling thread has its own
DEALER socket; requests are pipelined on it: a batch of gets goes out as one
request per block, so the copy of one reply into its tensor overlaps the
transfer of the next. A call that outlives `timeout_s` drops its socket (late
replies die with it) and fails: the tier is then unhealthy, costs misses,
and probes again after its back-off. ZeroMQ reconnects by itself.

An error reply (wrong token, a refused put) is counted by cause, logged once
per cause by the tier, and never raised into the engine.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import zmq
from pydantic import PositiveInt, SecretStr, field_validator, model_validator

from ..daemon import protocol as wire
from .blob import BlobBackend, BlobTier, Sink
from .spec import TierContext, TierSpec

logger = logging.getLogger(__name__)

SCHEME = "kvtier://"
CONNECT_WAIT_MS = 1000


class StoreSpec(TierSpec):
    type: Literal["store"] = "store"
    url: str = "kvtier://127.0.0.1:5555"
    token: SecretStr | None = None
    token_file: str | None = None
    in_flight: PositiveInt = 8  # get requests outstanding on one socket
    max_request_bytes: PositiveInt = 64 << 20  # puts are split into requests of about this size

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if not url.startswith(SCHEME) or not parts.hostname or parts.port is None:
            raise ValueError("url is kvtier://host:port")
        return url

    @model_validator(mode="after")
    def _one_token(self):
        if self.token is not None and self.token_file:
            raise ValueError("give token or token_file, not both")
        return self

    def secret(self) -> str:
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return ""

    def build(self, ctx: TierContext) -> BlobTier:
        parts = urlsplit(self.url)
        backend = StoreBackend(f"tcp://{parts.hostname}:{parts.port}", self.secret(), timeout_s=self.timeout_s,
                               in_flight=self.in_flight, max_request_bytes=self.max_request_bytes,
                               object_size=ctx.codec.encoded_size)
        return BlobTier(self.name or self.type, "store", backend, ctx.codec, health=self.health())


class StoreError(RuntimeError):
    """The daemon answered with an error (the tier turns it into misses)."""


class _FramesReader:
    """read / readinto over one object that arrived as several frames."""

    def __init__(self, frames: Sequence) -> None:
        self._views = [memoryview(frame.buffer if isinstance(frame, zmq.Frame) else frame).cast("B")
                       for frame in frames]
        self._at = 0

    def readinto(self, out) -> int:
        out = memoryview(out).cast("B")
        done = 0
        while done < len(out) and self._views:
            view = self._views[0]
            n = min(len(out) - done, len(view) - self._at)
            out[done:done + n] = view[self._at:self._at + n]
            done += n
            self._at += n
            if self._at == len(view):
                self._views.pop(0)
                self._at = 0
        return done

    def read(self, n: int) -> bytes:
        data = bytearray(n)
        return bytes(data[:self.readinto(data)])


class StoreBackend(BlobBackend):
    def __init__(self, endpoint: str, token: str = "", *, timeout_s: float = 5.0, in_flight: int = 8,
                 max_request_bytes: int = 64 << 20, get_request_bytes: int = 8 << 20,
                 object_size: Callable[[str], int] | None = None) -> None:
        self.endpoint = endpoint
        self.token = token
        self.timeout_ms = int(timeout_s * 1000)
        self.in_flight = in_flight
        self.max_request_bytes = max_request_bytes
        self.get_request_bytes = get_request_bytes
        self.object_size = object_size
        self._context = zmq.Context(io_threads=1)
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.refusals: Counter = Counter()  # cause -> count

    # -- transport ----------------------------------------------------------------

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a daemon that is not there
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            sock.connect(self.endpoint)
            self._local.socket = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def _drop_socket(self) -> None:
        sock = getattr(self._local, "socket", None)
        if sock is not None:
            self._local.socket = None
            with self._lock:
                self._sockets.remove(sock)
            sock.close(0)

    def _send(self, sock: zmq.Socket, request: wire.Request, payload: list = ()) -> None:
        # Writable once connected (IMMEDIATE): on loopback or a LAN that takes
        # well under a second, so a daemon that is down is known quickly.
        if not sock.poll(min(self.timeout_ms, CONNECT_WAIT_MS), zmq.POLLOUT):
            raise ConnectionError(f"store daemon at {self.endpoint} is not reachable")
        frames = [wire.encode(request), *payload]
        sock.send_multipart(frames, copy=len(frames) == 1)

    def _receive(self, sock: zmq.Socket, request_id: int, deadline: float) -> tuple[wire.Reply, list]:
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or not sock.poll(left, zmq.POLLIN):
                raise TimeoutError(f"store daemon at {self.endpoint}: no reply in {self.timeout_ms} ms")
            frames = sock.recv_multipart(copy=False)
            reply = wire.decode_reply(frames[0].buffer)
            if reply.id != request_id:
                continue  # a reply to a request given up earlier on this socket
            if not reply.ok:
                self._refused(f"{reply.code}: {reply.error}")
                raise StoreError(f"store daemon: {reply.code}: {reply.error}")
            return reply, frames[1:]

    def _exchange(self, requests: list[tuple[wire.Request, list]], on_reply, window: int) -> None:
        """Send the requests, at most `window` outstanding, and hand each reply
        to on_reply(position, reply, frames) in order. Any failure drops the
        socket, so no late reply can be taken for a later call's."""
        sock = self._socket()
        deadline = time.monotonic() + self.timeout_ms / 1000
        try:
            sent = 0
            for position, (request, _) in enumerate(requests):
                while sent < len(requests) and sent < position + window:
                    self._send(sock, *requests[sent])
                    sent += 1
                reply, frames = self._receive(sock, request.id, deadline)
                on_reply(position, reply, frames)
        except BaseException:
            self._drop_socket()
            raise

    def _request(self, op: str, keys: Sequence[str] = (), parts: Sequence[int] = ()) -> wire.Request:
        return wire.Request(wire.VERSION, next(self._ids), op, token=self.token, keys=list(keys), parts=list(parts))

    def _refused(self, cause: str) -> None:
        # Counted here; logged once per cause by the tier, which sees the error.
        self.refusals[cause] += 1

    # -- BlobBackend ------------------------------------------------------------------

    def write(self, names: Sequence[str], parts: Sequence[list]) -> list[Exception | None]:
        errors: list[Exception | None] = [None] * len(names)
        objects = [list(parts[i]) for i in range(len(names))]  # each encoded once
        requests, batches, batch, size = [], [], [], 0
        for i, obj in enumerate(objects):
            batch.append(i)
            size += sum(memoryview(buffer).nbytes for buffer in obj)
            if size >= self.max_request_bytes or i == len(names) - 1:
                batches.append(batch)
                batch, size = [], 0
        for batch in batches:
            request = self._request("put", [names[i] for i in batch], [len(objects[i]) for i in batch])
            requests.append((request, [buffer for i in batch for buffer in objects[i]]))

        def on_reply(position: int, reply: wire.Reply, _frames) -> None:
            for i, refused in zip(batches[position], reply.refused):
                if refused:
                    self._refused(refused)
                    errors[i] = StoreError(f"store daemon refused the put: {refused}")

        self._exchange(requests, on_reply, window=2)
        return errors

    def read(self, names: Sequence[str], sink: Sink) -> None:
        # Requests of about get_request_bytes each (by the objects' expected
        # sizes): small blocks share a round trip, big ones go one by one; all
        # pipelined, so the copy of one reply overlaps the next's transfer.
        groups, group, size = [], [], 0
        for i, name in enumerate(names):
            group.append(i)
            size += self.object_size(name) if self.object_size else self.get_request_bytes
            if size >= self.get_request_bytes or i == len(names) - 1:
                groups.append(group)
                group, size = [], 0
        requests = [(self._request("get", [names[i] for i in group]), []) for group in groups]

        def on_reply(position: int, reply: wire.Reply, frames) -> None:
            start = 0
            for i, count in zip(groups[position], reply.parts):
                if count:
                    mine = frames[start:start + count]
                    start += count
                    sink(i, _FramesReader(mine), sum(len(frame) for frame in mine))

        self._exchange(requests, on_reply, window=self.in_flight)

    def contains(self, names: Sequence[str]) -> list[bool]:
        found: list[bool] = []
        self._exchange([(self._request("exists", names), [])],
                       lambda _, reply, __: found.extend(reply.found), window=1)
        return found

    def exists(self, names: Sequence[str]) -> int:
        found = self.contains(names)
        return next((i for i, hit in enumerate(found) if not hit), len(found))

    def delete(self, names: Sequence[str]) -> None:
        if names:
            self._exchange([(self._request("delete", names), [])], lambda *_: None, window=1)

    def stats(self) -> dict:
        got: dict = {}
        self._exchange([(self._request("stats"), [])], lambda _, reply, __: got.update(reply.stats), window=1)
        return got

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close(0)
            self._sockets.clear()
        self._context.term()
