"""The filesystem tier: one file per block on any fsspec filesystem, a local
directory by default.

Writes go to a hidden temp name, then are renamed: a reader never sees half
a block. The index is rebuilt from the directory on start, so a restarted
process hits on blocks written before it.
"""
from __future__ import annotations

import io
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import AliasChoices, Field, PositiveInt, model_validator

from .blob import BlobBackend, BlobTier, Sink, info_mtime
from .spec import TierContext, TierSpec

SUFFIX = ".kvb"
STALE_TEMP_S = 3600.0  # temp files this old belong to a writer that died


def _size(f) -> int:
    try:
        return os.fstat(f.fileno()).st_size  # one syscall where there is a descriptor
    except (OSError, AttributeError, io.UnsupportedOperation):
        size = f.seek(0, 2)
        f.seek(0)
        return size


class FsSpec(TierSpec):
    type: Literal["fs"] = "fs"
    # A local directory: vLLM's root_dir, or path.
    root_dir: str | None = Field(None, validation_alias=AliasChoices("root_dir", "path"))
    url: str | None = None  # any fsspec URL (file://, memory://, ...)
    storage_options: dict = Field(default_factory=dict)
    max_bytes: PositiveInt | None = None
    fsync: bool = False  # durable against power loss, not only process death
    # Threads that read / write one batch of files (vLLM's keys; io_threads sets
    # both). vLLM's default is 16 each; here 2 measured best on 2 cores.
    n_read_threads: PositiveInt = 2
    n_write_threads: PositiveInt = 2

    @model_validator(mode="before")
    @classmethod
    def _io_threads(cls, data):
        if isinstance(data, dict) and "io_threads" in data:
            data = {**data}
            threads = data.pop("io_threads")
            data.setdefault("n_read_threads", threads)
            data.setdefault("n_write_threads", threads)
        return data

    @model_validator(mode="after")
    def _one_location(self):
        if self.root_dir and self.url:
            raise ValueError("give the fs tier `root_dir` (or `path`) or `url`, not both")
        return self

    @property
    def path(self) -> str | None:
        return self.root_dir

    def location(self) -> str:
        return self.url or self.path or os.path.join(os.path.expanduser("~"), ".cache", "kvtier", "blocks")

    def make_backend(self) -> FsBackend:
        fs, root = fsspec.core.url_to_fs(self.location(), **self.storage_options)
        return FsBackend(fs, root, fsync=self.fsync, read_threads=self.n_read_threads,
                         write_threads=self.n_write_threads)

    def build(self, ctx: TierContext) -> BlobTier:
        backend = self.make_backend()
        return BlobTier(self.name or self.type, "fs", backend, ctx.codec, capacity_bytes=self.max_bytes,
                        policy=ctx.policy_factory(self.eviction_policy), indexed=True, health=self.health())


class FsBackend(BlobBackend):
    def __init__(self, fs, root: str, *, fsync: bool = False, read_threads: int = 2, write_threads: int = 2) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.fsync = fsync
        self.fs.makedirs(self.root, exist_ok=True)
        self._made_dirs: set[str] = {self.root}
        # The caller's thread works too, beside threads - 1 helpers: waking a
        # pool thread per file and waiting for it cost more than a 6 MB read.
        self.read_threads, self.write_threads = read_threads, write_threads
        most = max(read_threads, write_threads) - 1
        self._helpers = ThreadPoolExecutor(most, thread_name_prefix="kv-fs-io") if most > 0 else None

    def _map(self, threads: int, function, *iterables) -> list:
        args = list(zip(*iterables))
        if self._helpers is None or threads < 2 or len(args) < 2:
            return [function(*a) for a in args]
        results = [None] * len(args)
        positions = iter(range(len(args)))
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    i = next(positions, None)
                if i is None:
                    return
                results[i] = function(*args[i])

        helpers = [self._helpers.submit(work) for _ in range(min(threads - 1, len(args) - 1))]
        try:
            work()
        finally:
            # A helper still queued behind another batch is not needed any more;
            # one that started must finish before the caller's buffers are let go.
            for helper in helpers:
                helper.cancel()
            wait(helpers)
        for helper in helpers:
            if not helper.cancelled() and helper.exception() is not None:
                raise helper.exception()
        return results

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}{SUFFIX}"

    def write(self, names: Sequence[str], parts: Sequence[list]) -> list[Exception | None]:
        return self._map(self.write_threads, self._write_one, names, parts)

    def _write_one(self, name: str, parts: list) -> Exception | None:
        path = self._path(name)
        directory, base = posixpath.split(path)
        temp = f"{directory}/.{base}.{uuid.uuid4().hex}.tmp"
        try:
            if directory not in self._made_dirs:
                self.fs.makedirs(directory, exist_ok=True)
                self._made_dirs.add(directory)
            with self.fs.open(temp, "wb") as f:
                for part in parts:
                    f.write(part)
                if self.fsync and hasattr(f, "fileno"):
                    f.flush()
                    os.fsync(f.fileno())
            self._rename(temp, path)
            return None
        except Exception as error:
            self._remove(temp)
            return error

    def _open_for_read(self, path: str):
        if isinstance(self.fs, LocalFileSystem):
            return open(path, "rb", buffering=0)  # payloads land straight in the tensor, no buffer between
        return self.fs.open(path, "rb")

    def _rename(self, source: str, target: str) -> None:
        if isinstance(self.fs, LocalFileSystem):
            os.replace(source, target)  # atomic; fsspec's mv would move *into* a directory in the way
        else:
            self.fs.mv(source, target)

    def read(self, names: Sequence[str], sink: Sink) -> None:
        def read_one(i: int) -> None:
            try:
                f = self._open_for_read(self._path(names[i]))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return
            with f:
                sink(i, f, _size(f))

        self._map(self.read_threads, read_one, range(len(names)))

    def exists(self, names: Sequence[str]) -> int:
        for n, name in enumerate(names):
            if not self.fs.exists(self._path(name)):
                return n
        return len(names)

    def contains(self, names: Sequence[str]) -> list[bool]:
        return [self.fs.exists(self._path(name)) for name in names]

    def delete(self, names: Sequence[str]) -> None:
        for name in names:
            self._remove(self._path(name))

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def scan(self) -> Iterable[tuple[str, int, float]]:
        now = time.time()
        for path, info in self.fs.find(self.root, detail=True).items():
            base = posixpath.basename(path)
            mtime = info_mtime(info)
            if base.startswith("."):
                if base.endswith(".tmp") and now - mtime > STALE_TEMP_S:
                    self._remove(path)
                continue
            if path.endswith(SUFFIX):
                yield path[len(self.root) + 1:-len(SUFFIX)], int(info["size"]), mtime

    def close(self) -> None:
        if self._helpers:
            self._helpers.shutdown(wait=True)
