"""The Redis tier: one string per block, pipelined batches over a few
connections in parallel, optional TTL. `redis://` and `rediss://` (TLS) URLs.

Connections, authentication and TLS are redis-py's. Two hot paths bypass its
command packing and reply parsing, which copy every payload: SET sends the
header and the tensor's memory as separate buffers of one bulk string, and
GET reads replies with BulkReplyReader into the destination tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import redis as redis_py
from pydantic import PositiveInt, field_validator
from redis.backoff import NoBackoff
from redis.retry import Retry

from .blob import BlobBackend, BlobTier, Sink
from .resp import BulkReplyReader
from .spec import TierContext, TierSpec


class RedisSpec(TierSpec):
    type: Literal["redis"] = "redis"
    url: str = "redis://127.0.0.1:6379/0"
    ttl: PositiveInt | None = None  # seconds; None: kept until Redis evicts it (maxmemory-policy)
    key_prefix: str = "kvtier:"
    connections: PositiveInt = 2  # batches are split over this many connections

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        return url

    def build(self, ctx: TierContext) -> BlobTier:
        backend = RedisBackend(self.url, ttl=self.ttl, key_prefix=self.key_prefix,
                               connections=self.connections, timeout_s=self.timeout_s)
        return BlobTier(self.name or self.type, "redis", backend, ctx.codec, health=self.health())


class RedisBackend(BlobBackend):
    def __init__(self, url: str, *, ttl: int | None = None, key_prefix: str = "kvtier:",
                 connections: int = 2, timeout_s: float = 5.0) -> None:
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.connections = connections
        # No retries inside redis-py: the tier's own back-off decides when to try again.
        self._pool = redis_py.ConnectionPool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self._client = redis_py.Redis(connection_pool=self._pool)
        self._threads = ThreadPoolExecutor(connections, thread_name_prefix="kv-redis")

    def _key(self, name: str) -> bytes:
        return (self.key_prefix + name).encode()

    def _on_connections(self, count: int, work: Callable[[object, list[int]], None]) -> None:
        """Run work(connection, positions) with the positions spread over the connections."""
        shares = [list(range(start, count, self.connections)) for start in range(min(self.connections, count))]

        def on_one(positions: list[int]) -> None:
            connection = self._pool.get_connection()
            try:
                work(connection, positions)
            except BaseException:
                connection.disconnect()  # the stream may be mid-reply
                raise
            finally:
                self._pool.release(connection)

        for _ in self._threads.map(on_one, shares):
            pass

    def _set_command(self, name: str, parts: list) -> list:
        size = sum(memoryview(part).nbytes for part in parts)
        key = self._key(name)
        argc, expiry = (5, b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(self.ttl)), self.ttl)) if self.ttl else (3, b"")
        head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (argc, len(key), key, size)
        return [head, *parts, b"\r\n" + expiry]

    def write(self, names: Sequence[str], parts: Sequence[list]) -> list[Exception | None]:
        errors: list[Exception | None] = [None] * len(names)

        def work(connection, positions: list[int]) -> None:
            for i in positions:
                connection.send_packed_command(self._set_command(names[i], parts[i]), check_health=False)
            for i in positions:
                try:
                    connection.read_response()
                except redis_py.ResponseError as error:  # e.g. OOM: this block only
                    errors[i] = error

        self._on_connections(len(names), work)
        return errors

    def read(self, names: Sequence[str], sink: Sink) -> None:
        def work(connection, positions: list[int]) -> None:
            connection.send_packed_command(connection.pack_commands([("GET", self._key(names[i])) for i in positions]),
                                           check_health=False)
            reader = BulkReplyReader(connection._sock)
            for i in positions:
                size = reader.open_bulk()
                if size is None:
                    continue
                try:
                    sink(i, reader, size)
                finally:
                    reader.close_bulk()
            if not reader.drained:
                raise redis_py.ConnectionError("unexpected data after the replies")

        self._on_connections(len(names), work)

    def exists(self, names: Sequence[str]) -> int:
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.exists(self._key(name))
        found = 0
        for hit in pipe.execute():
            if not hit:
                break
            found += 1
        return found

    def delete(self, names: Sequence[str]) -> None:
        if names:
            self._client.unlink(*(self._key(name) for name in names))

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        self._pool.disconnect()
