"""Shared fixtures: the default model loaded once, and HF transformers as the reference."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def default_model():
    from kvtier.engine.model.loader import load_model
    return load_model(None, torch.float32)


@pytest.fixture(scope="session")
def hf_reference(default_model):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(**default_model.hf_reference, dtype=torch.float32).eval()


# Real servers (redis-server, moto's S3, fake-gcs-server, kvtier store) on 127.0.0.1, one each per session.
@pytest.fixture(scope="session")
def redis_srv():
    import servers
    with servers.redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def s3_srv():
    import servers
    with servers.s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def store_srv():
    """A `kvtier store` daemon process (memory only, 256 MiB)."""
    import servers
    with servers.store_daemon("--cpu-bytes", str(256 << 20)) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def gcs_srv():
    import servers
    with servers.gcs_server() as server:
        yield server


_libc = None


@pytest.fixture(autouse=True)
def _shutdown_engines():
    import engines
    yield
    engines.shutdown_all()


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """Hand memory freed by a test back to the OS. Engines allocate and drop
    pools of hundreds of MB; glibc keeps freed arenas mapped, and over the
    suite the resident size of one pytest process otherwise climbs past the
    machine's memory."""
    yield
    global _libc
    import ctypes
    import gc
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
