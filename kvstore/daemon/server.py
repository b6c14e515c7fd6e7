"""The store daemon: an ObjectStore behind a ZeroMQ ROUTER socket.

One thread owns the socket and the store; it never blocks on a client. A
request is answered in full or with an error reply: a malformed, foreign,
oversized or unauthenticated message costs its sender an error frame and
nothing else. Frames larger than max_object_bytes make ZeroMQ drop the
connection before they are buffered; a bounded receive queue per client
keeps a flood from growing memory.

Replies to get are sent zero-copy from the pool and leased (a MessageTracker)
until the transport is done with them, so eviction never frees bytes still on
their way out and never counts bytes it cannot free.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import zmq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from zmq.utils.monitor import recv_monitor_message

from kvtier.policies import cache_policy_factory

from . import protocol as wire
from .config import StoreConfig
from .objects import ObjectStore, Persistence

logger = logging.getLogger(__name__)

# Per client connection: requests read off the wire before the loop takes
# them (this bounds what one connection can make the daemon hold: this many
# times max_object_bytes), and replies waiting to be written (past it, a
# client that does not read its replies loses the newest ones).
RECEIVE_QUEUE = 8
SEND_QUEUE = 1000
STATS_PERIOD_S = 0.5


class StoreServer:
    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self._token = (cfg.secret() or "").encode() or None
        policy = cache_policy_factory(cfg.eviction_policy)
        persistence = self._persistence(cfg, policy)
        self.store = ObjectStore(cfg.cpu_bytes, cfg.high_water, policy, quotas=cfg.namespace_quotas,
                                 persistence=persistence, max_namespaces=cfg.max_namespaces)
        self.counts: Counter = Counter()  # (name, label) -> count, for stats and metrics
        self.clients = 0
        self._in_flight: list[tuple[zmq.MessageTracker, list[str]]] = []
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, cfg.max_object_bytes + cfg.max_header_bytes)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        self._socket.setsockopt(zmq.SNDHWM, SEND_QUEUE)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client takes its identity back
        if cfg.port == 0:
            self.port = self._socket.bind_to_random_port(f"tcp://{cfg.host}")
        else:
            self._socket.bind(f"tcp://{cfg.host}:{cfg.port}")
            self.port = cfg.port
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._stop = threading.Event()
        self._snapshot: dict = {}
        self._snapshot_lock = threading.Lock()
        self._snapshot_at = 0.0
        self.last_tick = time.monotonic()
        self._http: ThreadingHTTPServer | None = None
        self.metrics_port: int | None = None
        if cfg.metrics_port is not None:
            self._serve_metrics(cfg.metrics_port)
        self._refresh_snapshot()

    # -- the loop -------------------------------------------------------------


    @staticmethod
    def _persistence(cfg: StoreConfig, policy) -> Persistence | None:
        """fs_path, then the secondary tiers, each with its own capacity."""
        levels = []
        if cfg.fs_path:
            from ..tiers.fs import FsSpec
            backend = FsSpec(url=cfg.fs_path, n_read_threads=1, n_write_threads=1).make_backend()
            levels.append(("fs", backend, cfg.fs_bytes))
        names = {name for name, _, _ in levels}
        for spec in cfg.persistent_specs():
            name, n = spec.name or spec.type, 2
            while name in names:
                name, n = f"{spec.name or spec.type}{n}", n + 1
            names.add(name)
            levels.append((name, spec.make_backend(), spec.max_bytes))
        return Persistence(levels, policy, cfg.fs_write_queue) if levels else None
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        logger.info("kvtier store listening on tcp://%s:%d", self.cfg.host, self.port)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(50))
                if self._monitor in ready:
                    self._client_events()
                if self._socket in ready:
                    for _ in range(256):  # then look at leases and stats again
                        try:
                            frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                self._release_sent()
                self.last_tick = now = time.monotonic()
                if now - self._snapshot_at > STATS_PERIOD_S:
                    self._refresh_snapshot()
        finally:
            self._close()

    def stop(self) -> None:
        self._stop.set()

    def _close(self) -> None:
        if self.store.persistence is not None:
            self.store.persistence.flush()
            self.store.persistence.close()
        self._socket.disable_monitor()
        self._monitor.close(0)
        self._socket.close(0)
        self._context.term()
        if self._http is not None:
            self._http.shutdown()

    def _client_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.clients += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.clients = max(0, self.clients - 1)

    def _release_sent(self) -> None:
        if not self._in_flight:
            return
        still = []
        for tracker, keys in self._in_flight:
            if tracker.done:
                self.store.release(keys)
            else:
                still.append((tracker, keys))
        self._in_flight = still

    # -- one request ------------------------------------------------------------

    def _handle(self, frames: list) -> None:
        if len(frames) < 2:
            self.counts["errors", wire.BAD_REQUEST] += 1
            return  # no header: nothing to answer
        identity, header, payload = frames[0], frames[1], frames[2:]
        request_id = 0
        try:
            request = wire.decode_request(header.buffer, self.cfg.max_header_bytes)
            request_id = request.id
            if self._token is not None and not hmac.compare_digest(request.token.encode(), self._token):
                self.counts["auth_failures", ""] += 1
                raise wire.ProtocolError(wire.UNAUTHORIZED, "a valid token is required")
            self._check_limits(request, payload)
            self.counts["requests", request.op] += 1
            reply, out, leased = getattr(self, f"_op_{request.op}")(request, payload)
        except wire.ProtocolError as error:
            self.counts["errors", error.code] += 1
            self._reply(identity, wire.Reply(wire.VERSION, request_id, ok=False, code=error.code, error=str(error)))
            return
        except Exception:  # a bug here must not take the daemon down
            logger.exception("store: request failed")
            self.counts["errors", wire.INTERNAL] += 1
            self._reply(identity, wire.Reply(wire.VERSION, request_id, ok=False, code=wire.INTERNAL,
                                             error="internal error"))
            return
        reply.id = request_id
        self._reply(identity, reply, out, leased)

    def _check_limits(self, request: wire.Request, payload: list) -> None:
        if len(request.keys) > self.cfg.max_keys:
            raise wire.ProtocolError(wire.TOO_LARGE, f"{len(request.keys)} keys, limit {self.cfg.max_keys}")
        if request.op != "put":
            if payload:
                raise wire.ProtocolError(wire.BAD_REQUEST, f"{request.op} carries no payload")
            return
        if len(request.parts) != len(request.keys) or any(n < 1 for n in request.parts):
            raise wire.ProtocolError(wire.BAD_REQUEST, "put: one parts count (>= 1) per key")
        if sum(request.parts) != len(payload):
            raise wire.ProtocolError(wire.BAD_REQUEST, f"put: parts say {sum(request.parts)} frames, "
                                                       f"{len(payload)} came")
        size = sum(len(frame) for frame in payload)
        if size > self.cfg.max_request_bytes:
            raise wire.ProtocolError(wire.TOO_LARGE, f"{size} payload bytes, limit {self.cfg.max_request_bytes}")

    def _reply(self, identity, reply: wire.Reply, out: list = (), leased: list[str] = ()) -> None:
        frames = [identity, wire.encode(reply)]
        if not out:
            self._socket.send_multipart(frames)
            return
        parts = [zmq.Frame(buffer, copy=False, track=True) for buffer in out]
        try:
            self._socket.send_multipart(frames + parts, copy=False)
        except zmq.ZMQError:  # the client is gone: nothing was queued
            self.store.release(list(leased))
            return
        self._in_flight.append((zmq.MessageTracker(*parts), list(leased)))

    # -- ops: each returns (reply, payload buffers, leased keys) ----------------

    def _op_exists(self, request, _payload):
        found = self.store.contains(request.keys)
        return wire.Reply(wire.VERSION, 0, found=found), [], []

    def _op_get(self, request, _payload):
        parts, out, leased, bytes_out = [], [], [], 0
        for key in request.keys:
            got = self.store.get(key)
            if got is None:
                parts.append(0)
                continue
            frames, lease = got
            if lease:
                leased.append(key)
            parts.append(len(frames))
            out.extend(frames)
            bytes_out += sum(memoryview(f).nbytes for f in frames)
        hits = sum(1 for n in parts if n)
        self.counts["hits", ""] += hits
        self.counts["misses", ""] += len(parts) - hits
        self.counts["bytes_out", ""] += bytes_out
        return wire.Reply(wire.VERSION, 0, parts=parts), out, leased

    def _op_put(self, request, payload):
        stored, refused, start = [], [], 0
        for key, count in zip(request.keys, request.parts):
            frames = tuple(frame.buffer for frame in payload[start:start + count])
            start += count
            size = sum(len(frame) for frame in frames)
            if size > self.cfg.max_object_bytes:
                outcome = wire.OBJECT_TOO_LARGE
                self.store.refused[outcome] += 1
            else:
                outcome = self.store.put(key, frames, size)
            stored.append(outcome == "")
            refused.append(outcome or "")
            if outcome == "":
                self.counts["bytes_in", ""] += size
        return wire.Reply(wire.VERSION, 0, stored=stored, refused=refused), [], []

    def _op_delete(self, request, _payload):
        self.store.delete(request.keys)
        return wire.Reply(wire.VERSION, 0), [], []

    def _op_stats(self, _request, _payload):
        return wire.Reply(wire.VERSION, 0, stats=self._stats()), [], []

    def _op_health(self, _request, _payload):
        return wire.Reply(wire.VERSION, 0), [], []

    # -- what an operator sees ----------------------------------------------------

    def _stats(self) -> dict:
        counts: dict = {}
        for (name, label), value in self.counts.items():
            counts.setdefault(name, {})[label or "total"] = value
        return {"counts": counts, "clients": self.clients, "memory": self.store.usage(),
                "namespaces": self.store.namespace_usage()}

    def _refresh_snapshot(self) -> None:
        snapshot = self._stats()
        with self._snapshot_lock:
            self._snapshot = snapshot
        self._snapshot_at = time.monotonic()

    def snapshot(self) -> dict:
        with self._snapshot_lock:
            return self._snapshot

    def _serve_metrics(self, port: int) -> None:
        registry = CollectorRegistry()
        registry.register(_StoreCollector(self))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] == "/metrics":
                    body, status, kind = generate_latest(registry), 200, "text/plain; version=0.0.4"
                elif self.path.split("?")[0] == "/health":
                    alive = time.monotonic() - server.last_tick < 5.0 and not server._stop.is_set()
                    body = json.dumps({"status": "ok" if alive else "stalled"}).encode()
                    status, kind = (200 if alive else 503), "application/json"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not news
                pass

        self._http = ThreadingHTTPServer((self.cfg.host, port), Handler)
        self._http.daemon_threads = True
        self.metrics_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="kvstore-metrics", daemon=True).start()


class _StoreCollector:
    """Prometheus families from the loop's latest snapshot (never the live
    structures, which only the loop thread may read)."""

    def __init__(self, server: StoreServer) -> None:
        self.server = server

    def collect(self):
        snap = self.server.snapshot()
        counts, memory = snap.get("counts", {}), snap.get("memory", {})

        def counter(name, doc, values: dict, label: str | None = None):
            family = CounterMetricFamily(f"kvtier_store_{name}", doc, labels=[label] if label else None)
            for key, value in values.items():
                family.add_metric([key] if label else [], value)
            return family

        def total(name):
            return {"": counts.get(name, {}).get("total", 0)}

        yield counter("requests", "Requests by op.", counts.get("requests", {}), "op")
        yield counter("hits", "Objects served by get.", total("hits"))
        yield counter("misses", "Keys get did not find.", total("misses"))
        yield counter("bytes_in", "Payload bytes stored.", total("bytes_in"))
        yield counter("bytes_out", "Payload bytes served.", total("bytes_out"))
        yield counter("auth_failures", "Requests without a valid token.", total("auth_failures"))
        yield counter("errors", "Error replies by code.", counts.get("errors", {}), "code")
        yield counter("refused_puts", "Puts refused, by reason.", memory.get("refused", {}), "reason")
        persistent = memory.get("persistent") or {}
        yield counter("evictions", "Objects evicted, by tier.",
                      {"cpu": memory.get("evictions", 0), **{n: t["evictions"] for n, t in persistent.items()}}, "tier")
        yield counter("tier_errors", "Failed reads, writes or deletes of a persistent tier.",
                      {n: t["errors"] for n, t in persistent.items()}, "tier")
        usage = GaugeMetricFamily("kvtier_store_usage_bytes", "Bytes held, by tier.", labels=["tier"])
        usage.add_metric(["cpu"], memory.get("used_bytes", 0))
        for name, tier in persistent.items():
            usage.add_metric([name], tier["used_bytes"])
        yield usage
        capacity = GaugeMetricFamily("kvtier_store_capacity_bytes", "The memory pool's capacity.")
        capacity.add_metric([], memory.get("capacity_bytes", 0))
        yield capacity
        namespaces = GaugeMetricFamily("kvtier_store_namespace_bytes", "Bytes held in memory, by namespace.",
                                       labels=["namespace"])
        for name, size in snap.get("namespaces", {}).items():
            namespaces.add_metric([name], size)
        yield namespaces
        clients = GaugeMetricFamily("kvtier_store_connected_clients", "Client connections open.")
        clients.add_metric([], snap.get("clients", 0))
        yield clients
