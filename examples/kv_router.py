"""A small KV-aware router: it follows the KV events of several kvtier (or
vLLM) replicas and sends each request to the replica that holds the longest
prefix of its prompt.

    router = KVAwareRouter(["tcp://10.0.0.1:5557", "tcp://10.0.0.2:5557"], block_size=16)
    replica = router.route(prompt_token_ids)     # an index into the list
    ...
    router.done(replica)                         # when the request has finished

The index keeps, per replica, the block hashes its events said it stores
(any medium: the device pool or a tier) and forgets those it removed. A
prompt's block hashes are computed the way the engine computes them
(chained SHA-256 over each block's token ids, kvtier.engine's block_hash),
so a hit is a lookup per block. Ties, and prompts no replica holds, go to
the replica with the fewest requests in flight, then round robin.
"""
from __future__ import annotations

import threading

import msgspec
import zmq

from kvtier.connectors.kv_events import KVEventBatch
from kvtier.engine.core.kv_cache.block_hash import extend_block_hashes


class KVAwareRouter:
    def __init__(self, endpoints: list[str], block_size: int = 16, topic: str = "") -> None:
        self.block_size = block_size
        self.held: list[dict[bytes, set[str]]] = [{} for _ in endpoints]  # hash -> media holding it
        self.in_flight = [0] * len(endpoints)
        self.events_seen = 0
        self._turn = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context.instance()
        self._sockets = []
        for endpoint in endpoints:
            sub = self._ctx.socket(zmq.SUB)
            sub.connect(endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
            self._sockets.append(sub)
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self._thread = threading.Thread(target=self._listen, name="kv-router", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        poller = zmq.Poller()
        for sub in self._sockets:
            poller.register(sub, zmq.POLLIN)
        while not self._stop.is_set():
            for sub, _ in poller.poll(100):
                _, _, payload = sub.recv_multipart()
                self._apply(self._sockets.index(sub), self._decoder.decode(payload))

    def _apply(self, replica: int, batch: KVEventBatch) -> None:
        held = self.held[replica]
        with self._lock:
            for event in batch.events:
                self.events_seen += 1
                kind = type(event).__name__
                if kind == "AllBlocksCleared":
                    for media in held.values():
                        media.discard("device")
                    continue
                for h in event.block_hashes:
                    if kind == "BlockStored":
                        held.setdefault(h, set()).add(event.medium)
                    else:
                        media = held.get(h)
                        if media is not None:
                            media.discard(event.medium)
                            if not media:
                                del held[h]

    def prefix_blocks(self, token_ids: list[int], cache_salt: str | None = None) -> list[int]:
        """Per replica, how many leading blocks of the prompt it holds."""
        hashes: list[bytes] = []
        extend_block_hashes(hashes, token_ids, self.block_size, cache_salt)
        out = []
        with self._lock:
            for held in self.held:
                n = 0
                while n < len(hashes) and hashes[n] in held:
                    n += 1
                out.append(n)
        return out

    def route(self, token_ids: list[int], cache_salt: str | None = None) -> int:
        prefix = self.prefix_blocks(token_ids, cache_salt)
        with self._lock:
            longest = max(prefix)
            tied = [r for r in range(len(prefix)) if prefix[r] == longest]
            least = min(self.in_flight[r] for r in tied)
            tied = [r for r in tied if self.in_flight[r] == least]
            best = tied[self._turn % len(tied)]  # round robin among equals spreads what nobody holds
            self._turn += 1
            self.in_flight[best] += 1
        return best

    def done(self, replica: int) -> None:
        with self._lock:
            self.in_flight[replica] -= 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sub in self._sockets:
            sub.close(0)
