"""The `kvtier store` daemon's put and get throughput and latency, side by
side with raw redis-py SET/GET of the same bytes to a local redis-server and
with a raw pyzmq request/reply of the same frames (the transport's ceiling
on this machine).

    python -m benchmarks.bench_store [--rounds 12] [--clients 1 2 4]

Blocks are the default model's offload block: [30 layers, K/V, 256 tokens,
3 KV heads, head_dim 64], float32 (11.8 MB) and float16 (5.9 MB), four to a
batch. Each of N client processes puts its own fresh blocks, then gets them
back; the daemon side goes through the real `store` tier (encode and
checksum on put, verify into the destination tensor on get). Throughput is
all clients' bytes over the phase's wall time; latency is per batch. Each
side runs --reps times, the order rotating; the tables give medians, and a
ratio is the median of the paired runs' ratios.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import emit_json, median, percentile, print_table  # noqa: E402

import servers  # noqa: E402

SHAPE = (30, 2, 256, 3, 64)
BATCH = 4
TARGETS = {"get_vs_zmq": 0.9, "get_vs_redis": 3.0, "put_vs_zmq": 0.8}


# -- the three clients: each returns (put latencies, get latencies, bytes per batch) ----------

def _store_client(url: str, dtype, rounds: int, barrier) -> tuple[list, list, int]:
    from kvtier.kvstore import make_key
    from kvtier.kvstore.block_format import BlockCodec
    from kvtier.kvstore.tiers import TierContext, build_tier
    from kvtier.policies import cache_policy_factory

    codec = BlockCodec("bench-model", dtype, SHAPE)
    tier = build_tier({"type": "store", "url": url, "timeout_s": 30},
                      TierContext(codec, lambda _: cache_policy_factory("lru")()))
    blocks = torch.randn((BATCH, *SHAPE)).to(dtype)
    out = torch.empty_like(blocks)
    prefix = uuid.uuid4().hex[:8]
    batches = [[make_key(prefix, "m", "L", f"{r}-{i}") for i in range(BATCH)] for r in range(rounds)]
    puts, gets = [], []
    barrier.wait()
    for keys in batches:
        t = time.perf_counter()
        assert tier.put(keys, blocks) == BATCH, "a put was refused"
        puts.append(time.perf_counter() - t)
    barrier.wait()
    for keys in batches:
        t = time.perf_counter()
        got = tier.get(keys, out)
        gets.append(time.perf_counter() - t)
        assert all(g is not None for g in got), "a get missed"
    barrier.wait()
    size = sum(codec.encoded_size(k) for k in batches[0])
    tier.close()
    return puts, gets, size


def _redis_client(url: str, dtype, rounds: int, barrier) -> tuple[list, list, int]:
    import redis

    client = redis.Redis.from_url(url)
    value = torch.randn(SHAPE).to(dtype).view(torch.uint8).numpy().tobytes()
    prefix = uuid.uuid4().hex[:8]
    batches = [[f"{prefix}:{r}:{i}" for i in range(BATCH)] for r in range(rounds)]
    puts, gets = [], []
    barrier.wait()
    for keys in batches:
        t = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, value)
        pipe.execute()
        puts.append(time.perf_counter() - t)
    barrier.wait()
    for keys in batches:
        t = time.perf_counter()
        got = client.mget(keys)
        gets.append(time.perf_counter() - t)
        assert all(g is not None and len(g) == len(value) for g in got)
    barrier.wait()
    client.delete(*(k for keys in batches for k in keys))
    return puts, gets, BATCH * len(value)


def _zmq_echo_server(port_queue) -> None:
    """The ceiling: a ROUTER that keeps put frames as they came and sends them back on get."""
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    port_queue.put(port)
    held: dict[bytes, list] = {}
    while True:
        frames = sock.recv_multipart(copy=False)
        identity, op, key = frames[0], frames[1].bytes, frames[2].bytes
        if op == b"put":
            held[key] = frames[3:]
            sock.send_multipart([identity, b"ok"])
        elif op == b"get":
            sock.send_multipart([identity, b"ok", *held.pop(key)], copy=False)
        else:
            return


def _zmq_client(endpoint: str, dtype, rounds: int, barrier) -> tuple[list, list, int]:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    block = torch.randn(SHAPE).to(dtype).view(torch.uint8).numpy()
    prefix = uuid.uuid4().hex[:8].encode()
    puts, gets = [], []
    barrier.wait()
    for r in range(rounds):
        t = time.perf_counter()
        sock.send_multipart([b"put", b"%s-%d" % (prefix, r), *[block] * BATCH], copy=False)
        sock.recv_multipart()
        puts.append(time.perf_counter() - t)
    barrier.wait()
    for r in range(rounds):
        t = time.perf_counter()
        sock.send_multipart([b"get", b"%s-%d" % (prefix, r)])
        frames = sock.recv_multipart(copy=False)
        gets.append(time.perf_counter() - t)
        assert len(frames) == 1 + BATCH
    barrier.wait()
    sock.close(0)
    return puts, gets, BATCH * block.nbytes


CLIENTS = {"store": _store_client, "redis-py": _redis_client, "pyzmq": _zmq_client}


def _client_main(kind, address, dtype, rounds, barrier, results) -> None:
    torch.set_num_threads(1)
    results.put(CLIENTS[kind](address, dtype, rounds, barrier))


def run(kind: str, address: str, dtype, clients: int, rounds: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(kind, address, dtype, rounds, barrier, results))
             for _ in range(clients)]
    for p in procs:
        p.start()
    barrier.wait()  # all connected and ready
    t0 = time.perf_counter()
    barrier.wait()  # puts done
    t1 = time.perf_counter()
    barrier.wait()  # gets done
    t2 = time.perf_counter()
    outs = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    nbytes = sum(size * rounds for _, _, size in outs)
    puts = [x for p, _, _ in outs for x in p]
    gets = [x for _, g, _ in outs for x in g]
    return {"put_GBps": nbytes / (t1 - t0) / 1e9, "get_GBps": nbytes / (t2 - t1) / 1e9,
            "put_p50_ms": median(puts) * 1e3, "put_p99_ms": percentile(puts, 99) * 1e3,
            "get_p50_ms": median(gets) * 1e3, "get_p99_ms": percentile(gets, 99) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12, help="batches of 4 blocks per client and phase")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--reps", type=int, default=5, help="runs of each side, medians reported")
    args = ap.parse_args()
    print("$ python -m benchmarks.bench_store " + " ".join(sys.argv[1:]), flush=True)
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    echo = ctx.Process(target=_zmq_echo_server, args=(ports,), daemon=True)
    echo.start()
    zmq_endpoint = f"tcp://127.0.0.1:{ports.get(timeout=30)}"
    rows, results = [], []
    with servers.store_daemon("--cpu-bytes", str(8 << 30)) as daemon, \
            servers.redis_server("--maxmemory", "8gb") as redis:
        addresses = {"store": daemon.url, "redis-py": redis.url, "pyzmq": zmq_endpoint}
        kinds = list(CLIENTS)
        for dtype in (torch.float32, torch.float16):
            for clients in args.clients:
                reps: dict[str, list[dict]] = {kind: [] for kind in kinds}
                for rep in range(args.reps):  # which side goes first rotates
                    for kind in kinds[rep % 3:] + kinds[:rep % 3]:
                        reps[kind].append(run(kind, addresses[kind], dtype, clients, args.rounds))
                got = {kind: {metric: median([r[metric] for r in runs]) for metric in runs[0]}
                       for kind, runs in reps.items()}

                def ratio(metric, base):
                    return median([a[metric] / b[metric] for a, b in zip(reps["store"], reps[base])])

                ratios = {"get_vs_zmq": ratio("get_GBps", "pyzmq"), "get_vs_redis": ratio("get_GBps", "redis-py"),
                          "put_vs_zmq": ratio("put_GBps", "pyzmq"), "put_vs_redis": ratio("put_GBps", "redis-py")}
                results.append({"dtype": str(dtype), "clients": clients, **got, **ratios, "runs": reps})
                name = str(dtype).removeprefix("torch.")
                for kind in CLIENTS:
                    g = got[kind]
                    rows.append([name, clients, kind, g["put_GBps"], g["put_p50_ms"], g["put_p99_ms"],
                                 g["get_GBps"], g["get_p50_ms"], g["get_p99_ms"]])
                print(f"  {name} x{clients}: get/zmq {ratios['get_vs_zmq']:.2f} get/redis {ratios['get_vs_redis']:.2f} "
                      f"put/zmq {ratios['put_vs_zmq']:.2f}", flush=True)
    echo.terminate()
    print_table(f"Store daemon vs raw redis-py and raw pyzmq (batches of 4 offload blocks, median of {args.reps})",
                ["dtype", "clients", "client", "put GB/s", "put p50 ms", "put p99 ms", "get GB/s", "get p50 ms",
                 "get p99 ms"], rows)
    print_table("Ratios (daemon / baseline)", ["dtype", "clients", "get/pyzmq", "get/redis-py", "put/pyzmq",
                                               "put/redis-py"],
                [[r["dtype"].removeprefix("torch."), r["clients"], r["get_vs_zmq"], r["get_vs_redis"],
                  r["put_vs_zmq"], r["put_vs_redis"]] for r in results])
    print(f"targets: get >= {TARGETS['get_vs_zmq']}x pyzmq and >= {TARGETS['get_vs_redis']}x redis-py; "
          f"put >= {TARGETS['put_vs_zmq']}x pyzmq")
    emit_json("bench_store", {"results": results, "targets": TARGETS})


if __name__ == "__main__":
    main()
