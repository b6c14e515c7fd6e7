"""What moving N bytes costs each tier's own transport with nothing of kvtier in
the way: the floor a tier hit is held to.

  cpu    one memcpy of N bytes (torch copy_ between two host buffers)
  fs     one read of an N-byte file in the same directory, page cache warm
  redis  one redis-py GET of an N-byte value on the same redis-server
  obj    one boto3 get_object(...).read() of an N-byte object in the same bucket
  store  one raw pyzmq DEALER/ROUTER reply of N bytes over loopback (the
         daemon's transport, with no daemon)

Each is the median of `reps` after one untimed warm-up. One object of all the
bytes, whatever the tier's block size: a hit made of many small blocks is held
to the floor of one big transfer, so per-block round trips show as the gap.
"""
from __future__ import annotations

import os
import threading
import uuid

import torch

from benchmarks.common import median_time


def memcpy_s(nbytes: int, reps: int = 3) -> float:
    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    return median_time(lambda: dst.copy_(src), reps)


def file_read_s(directory: str, nbytes: int, reps: int = 3) -> float:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"raw-floor-{uuid.uuid4().hex}")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * (nbytes >> 20) + os.urandom(nbytes & ((1 << 20) - 1)))
    buf = bytearray(nbytes)

    def read():
        with open(path, "rb", buffering=0) as f:
            view, got = memoryview(buf), 0
            while got < nbytes:
                got += f.readinto(view[got:])

    try:
        return median_time(read, reps)
    finally:
        os.unlink(path)


def redis_get_s(url: str, nbytes: int, reps: int = 3) -> float:
    import redis

    client = redis.Redis.from_url(url)
    key = f"raw-floor-{uuid.uuid4().hex}"
    client.set(key, os.urandom(nbytes))
    try:
        return median_time(lambda: client.get(key), reps)
    finally:
        client.delete(key)
        client.close()


def s3_get_s(client, bucket: str, nbytes: int, reps: int = 3) -> float:
    key = f"raw-floor-{uuid.uuid4().hex}"
    client.put_object(Bucket=bucket, Key=key, Body=os.urandom(nbytes))
    try:
        return median_time(lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(), reps)
    finally:
        client.delete_object(Bucket=bucket, Key=key)


def zmq_reply_s(nbytes: int, reps: int = 3) -> float:
    import zmq

    context = zmq.Context()
    server, client = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    blob = os.urandom(nbytes)

    def serve():
        while True:
            identity, op = server.recv_multipart()
            if op == b"stop":
                return
            server.send_multipart([identity, blob], copy=False)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def get():
        client.send(b"get")
        assert len(client.recv(copy=False)) == nbytes

    try:
        return median_time(get, reps)
    finally:
        client.send(b"stop")
        thread.join(5)
        client.close(0)
        server.close(0)
        context.term()
