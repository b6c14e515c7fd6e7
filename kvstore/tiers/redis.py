"""The Redis tier: strings, pipelined batches over a few connections in
parallel, optional TTL. `redis://` and `rediss://` (TLS) URLs; a Redis
Cluster with `cluster: true` or a list of `startup_nodes`.

A block of up to 3 MiB is one string. A larger one is cut into near-equal
pieces stored under "{key}", "{key}#1", ... (one hash slot). Redis's allocator
maps and unmaps every value of 8 MiB and more page by page (jemalloc's
oversize threshold), which made a SET of an 11.8 MB block 2-3x slower than its
pieces; and GETs of four 5.9 MB values took 17-19 ms where the same blocks
in 3 MB pieces took 12-16 ms. A hash would copy every field on HSET. (All
measured here, Redis 7.0.) The first piece,
which holds the header, is written last: a reader that finds it finds the
whole block. A piece lost on its own (an LRU eviction) makes the block short:
a miss.

Connections, authentication and TLS are redis-py's. The hot paths bypass its
command packing and reply parsing, which copy every payload: SET sends the
header and slices of the tensor's memory as they are, and MGET replies are
read with ReplyReader straight into the destination tensors.

In a cluster the hot paths stay the same, per node: all pieces of a block
share the block's hash slot (the `{key}` hash tag), so a batch is split by
the node that owns each block's slot, and each node's share goes over that
node's own connections. A redirect (MOVED, ASK), a cluster that is down or a
node that is gone fails the whole batch: the tier's back-off takes over, and
the next call first asks the cluster for its slot map again. Lookups and
deletes go through redis-py's cluster client, which routes them itself.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import redis as redis_py
from pydantic import AfterValidator, Field, PositiveInt, SecretStr, field_validator, model_validator
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, ClusterDownError, TryAgainError
from redis.retry import Retry

from .blob import BlobBackend, BlobTier, Sink
from .resp import ArrayStream, ReplyReader
from .spec import TierContext, TierSpec

MAX_PIECE = 3 << 20

# Replies that say the slot map we routed by is stale, or the cluster is not
# serving: a failure of the batch, never of one block (AskError covers MOVED,
# ClusterDownError covers MASTERDOWN).
_CLUSTER_ERRORS = (AskError, TryAgainError, ClusterDownError)


def _node_address(url: str) -> str:
    """A startup node: redis://host:port or rediss://host:port, nothing else."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("a startup node carries no credentials: give them in `password`")
    try:
        port = parts.port
    except ValueError:
        port = None
    if (parts.scheme not in ("redis", "rediss") or not parts.hostname or port is None
            or parts.path not in ("", "/", "/0") or parts.query or parts.fragment):
        raise ValueError(f"a startup node is redis://host:port or rediss://host:port, not {url!r}")
    return url


NodeUrl = Annotated[str, AfterValidator(_node_address)]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


class RedisSpec(TierSpec):
    type: Literal["redis"] = "redis"
    url: str = "redis://127.0.0.1:6379/0"  # a password in it moves to `password`, out of every log
    password: SecretStr | None = None
    ttl: PositiveInt | None = None  # seconds; None: kept until Redis evicts it (maxmemory-policy)
    key_prefix: str = "kvtier:"
    connections: PositiveInt = 2  # batches are split over this many connections (in a cluster: per node)
    # Redis Cluster: `url` is one node of it, or `startup_nodes` (which imply
    # `cluster`) are several; the client discovers the rest. `password` and
    # `timeout_s` apply to every node.
    cluster: bool = False
    startup_nodes: list[NodeUrl] | None = Field(None, min_length=1)  # ["redis://host:port", ...]

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        return url

    @field_validator("startup_nodes")
    @classmethod
    def _one_scheme(cls, nodes: list[str] | None) -> list[str] | None:
        if nodes and len({urlsplit(node).scheme for node in nodes}) > 1:
            raise ValueError("all redis:// or all rediss://, not a mix")
        return nodes

    @model_validator(mode="after")
    def _password_out_of_the_url(self):
        parts = urlsplit(self.url)
        if parts.password is not None:
            if self.password is None:
                self.password = SecretStr(unquote(parts.password))
            user = f"{parts.username}@" if parts.username else ""
            netloc = user + (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
            self.url = urlunsplit(parts._replace(netloc=netloc))
        return self

    @model_validator(mode="after")
    def _cluster_nodes(self):
        if self.startup_nodes:
            if "url" in self.model_fields_set:
                raise ValueError("startup_nodes: name the cluster's nodes in startup_nodes or in url, not both")
            self.cluster = True
        elif self.cluster:
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                raise ValueError("url: a cluster is reached over redis:// or rediss://, not a unix socket")
            if parts.path.strip("/") not in ("", "0"):
                raise ValueError("url: a cluster has database 0 only")
        return self

    def build(self, ctx: TierContext) -> BlobTier:
        backend = RedisBackend(self.url, ctx.codec.encoded_size, ttl=self.ttl, key_prefix=self.key_prefix,
                               connections=self.connections, timeout_s=self.timeout_s,
                               password=self.password.get_secret_value() if self.password else None,
                               cluster=self.cluster, startup_nodes=self.startup_nodes or ())
        return BlobTier(self.name or self.type, "redis", backend, ctx.codec, health=self.health())


def _bulk(data) -> list:
    """RESP bulk string framing around a buffer, without copying it."""
    return [b"$%d\r\n" % memoryview(data).nbytes, data, b"\r\n"]


def _coalesced(buffers: list) -> list:
    """Join runs of small buffers (framing, keys) so that each send is worth a syscall."""
    out, small = [], []
    for buffer in buffers:
        if memoryview(buffer).nbytes < 65536:
            small.append(buffer)
            continue
        if small:
            out.append(b"".join(small))
            small = []
        out.append(buffer)
    if small:
        out.append(b"".join(small))
    return out


def _pieces(parts: list, size: int) -> list[list]:
    """Cut an object (buffers back to back, `size` bytes) into near-equal
    pieces of at most MAX_PIECE bytes, each a list of slices."""
    count = max(1, -(-size // MAX_PIECE))
    room_per_piece = -(-size // count)
    pieces, current, room = [], [], room_per_piece
    for part in parts:
        view = memoryview(part).cast("B")
        while len(view):
            take = view[:room]
            current.append(take)
            view = view[len(take):]
            room -= len(take)
            if not room:
                pieces.append(current)
                current, room = [], room_per_piece
    if current or not pieces:
        pieces.append(current)
    return pieces


class RedisBackend(BlobBackend):
    def __init__(self, url: str, object_size: Callable[[str], int], *, ttl: int | None = None,
                 key_prefix: str = "kvtier:", connections: int = 2, timeout_s: float = 5.0,
                 password: str | None = None, cluster: bool = False, startup_nodes: Sequence[str] = ()) -> None:
        self.object_size = object_size  # the fields to ask for follow from the block's size
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.connections = connections
        self.cluster = cluster or bool(startup_nodes)
        # redis-py retries a command on a dropped connection, with back-off; a
        # server that stays down is then the tier's back-off's business. The bulk
        # reads and writes bypass its command layer: one failure there is a miss.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), 2)
        options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                   **({"password": password} if password else {})}
        self._pool: redis_py.ConnectionPool | None = None
        self._client: redis_py.Redis | RedisCluster | None = None
        self._refresh_lock = threading.Lock()
        if self.cluster:
            nodes = list(startup_nodes) or [url]
            # RedisCluster connects when it is made: at the first call, so that a
            # cluster down when the tier is built costs misses, not the start.
            # The first node's URL gives the scheme (TLS) and options of all.
            self._connect = lambda: RedisCluster(
                url=nodes[0], startup_nodes=[ClusterNode(*_host_port(node)) for node in nodes[1:]],
                retry=retry, **options)
            self._stale = True  # make the client, or ask for the slot map again, before the next use
            # Each node's share of a batch goes over `connections` connections;
            # the pool starts threads only as the shares in flight need them.
            threads = connections * 64
        else:
            self._pool = redis_py.ConnectionPool.from_url(url, retry=retry, **options)
            self._client = redis_py.Redis(connection_pool=self._pool)
            self._stale = False
            threads = connections
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="kv-redis")

    def _keys(self, name: str, size: int) -> list[bytes]:
        """The keys of an object of `size` bytes, first piece first."""
        base = f"{self.key_prefix}{{{name}}}".encode()
        return [base] + [b"%s#%d" % (base, n) for n in range(1, max(1, -(-size // MAX_PIECE)))]

    def _connected(self):
        """The client; in a cluster made, or its slot map asked for again, when due."""
        if self._stale:
            with self._refresh_lock:
                if self._stale:
                    if self._client is None:
                        self._client = self._connect()
                    else:
                        self._client.nodes_manager.initialize()
                    self._stale = False
        return self._client

    def _by_pool(self, names: Sequence[str]) -> list[tuple[object, list[int]]]:
        """The positions of `names` per connection pool: one, or in a cluster
        one per node that owns the slot of some of the blocks."""
        if not self.cluster:
            return [(self._pool, list(range(len(names))))]
        client = self._connected()
        by_node: dict[str, tuple[object, list[int]]] = {}
        for i, name in enumerate(names):
            node = client.nodes_manager.get_node_from_slot(client.keyslot(self._keys(name, 0)[0]))
            by_node.setdefault(node.name, (node.redis_connection.connection_pool, []))[1].append(i)
        return list(by_node.values())

    def _on_connections(self, names: Sequence[str], work: Callable[[object, list[int]], None]) -> None:
        """Run work(connection, positions) with the positions of `names` spread
        over the connections (in a cluster, each node's over its own)."""

        def on_one(pool, positions: list[int]) -> None:
            connection = pool.get_connection()
            try:
                work(connection, positions)
            except BaseException:
                connection.disconnect()  # the stream may be mid-reply
                raise
            finally:
                pool.release(connection)

        try:
            shares = [(pool, positions[start::self.connections]) for pool, positions in self._by_pool(names)
                      for start in range(min(self.connections, len(positions)))]
            # Wait for every connection's share before reporting a failure: a share
            # still running would go on writing into the caller's buffers.
            futures = [self._threads.submit(on_one, pool, share) for pool, share in shares]
            wait(futures)
            for future in futures:
                if future.exception() is not None:
                    raise future.exception()
        except Exception:
            if self.cluster:  # a node gone, a slot moved: route the next call by a fresh slot map
                self._stale = True
            raise

    def _set_commands(self, name: str, parts: list) -> tuple[list, int]:
        """SET commands for every piece, the first (header) piece last; and their count."""
        size = sum(memoryview(part).nbytes for part in parts)
        keys, pieces = self._keys(name, size), _pieces(parts, size)
        expiry = [*_bulk(b"EX"), *_bulk(b"%d" % self.ttl)] if self.ttl else []
        command = []
        for key, piece in reversed(list(zip(keys, pieces))):
            length = sum(len(s) for s in piece)
            command += [b"*%d\r\n" % (5 if self.ttl else 3), *_bulk(b"SET"), *_bulk(key),
                        b"$%d\r\n" % length, *piece, b"\r\n", *expiry]
        return _coalesced(command), len(pieces)

    def write(self, names: Sequence[str], parts: Sequence[list]) -> list[Exception | None]:
        errors: list[Exception | None] = [None] * len(names)

        def work(connection, positions: list[int]) -> None:
            replies = []
            for i in positions:
                command, count = self._set_commands(names[i], parts[i])
                connection.send_packed_command(command, check_health=False)
                replies.append(count)
            for i, count in zip(positions, replies):
                for _ in range(count):
                    try:
                        connection.read_response()
                    except _CLUSTER_ERRORS:
                        raise  # routed by a stale slot map, or the cluster is down: the batch fails
                    except redis_py.ResponseError as error:  # e.g. OOM: this block only
                        errors[i] = error

        self._on_connections(names, work)
        return errors

    def read(self, names: Sequence[str], sink: Sink) -> None:
        def work(connection, positions: list[int]) -> None:
            commands = [(b"MGET", *self._keys(names[i], self.object_size(names[i]))) for i in positions]
            connection.send_packed_command(connection.pack_commands(commands), check_health=False)
            reader = ReplyReader(connection._sock)
            for i in positions:
                stream = ArrayStream(reader, reader.open_array() or 0)
                try:
                    if stream.present():
                        sink(i, stream, self.object_size(names[i]))
                finally:
                    stream.finish()
            if not reader.drained:
                raise redis_py.ConnectionError("unexpected data after the replies")

        self._on_connections(names, work)

    # Lookups and deletes go through redis-py's client; in a cluster its
    # pipeline routes each command by its key's slot, and UNLINK of many
    # keys is split by slot.

    def exists(self, names: Sequence[str]) -> int:
        pipe = self._connected().pipeline(transaction=False)
        for name in names:
            pipe.exists(self._keys(name, 0)[0])
        found = 0
        for hit in pipe.execute():
            if not hit:
                break
            found += 1
        return found

    def contains(self, names: Sequence[str]) -> list[bool]:
        pipe = self._connected().pipeline(transaction=False)
        for name in names:
            pipe.exists(self._keys(name, 0)[0])
        return [bool(hit) for hit in pipe.execute()]

    def delete(self, names: Sequence[str]) -> None:
        if names:
            self._connected().unlink(*(key for name in names for key in self._keys(name, self.object_size(name))))

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        if self._pool is not None:
            self._pool.disconnect()
        elif self._client is not None:
            self._client.close()
