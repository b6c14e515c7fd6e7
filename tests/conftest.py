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


# Real servers (redis-server, moto's S3, fake-gcs-server) on 127.0.0.1, one each per session.
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
def gcs_srv():
    import servers
    with servers.gcs_server() as server:
        yield server
