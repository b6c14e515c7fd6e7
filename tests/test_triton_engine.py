"""The engine's fused-attention wiring, end to end through the Triton kernel.

Without a GPU the kernel runs under TRITON_INTERPRET=1, which must be set before
triton is imported, so the engine runs in a child process."""
import json
import os
import subprocess
import sys

import pytest

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

pytest.importorskip("triton", reason="triton is not installed")

PROMPTS = ["The capital of France is",
           "Count with me: one, two, three, four, five, six, seven, eight, nine, ten, eleven"]
CHILD = """
import json, sys
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.core.sampling_params import SamplingParams
llm = LLM(max_num_batched_tokens=24)
outs = llm.generate(json.loads(sys.argv[1]), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
print(json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def test_triton_path_matches_torch_path(default_model):
    env = dict(os.environ, TRITON_INTERPRET="1", KVTIER_ATTENTION="triton")
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(PROMPTS)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    fused = json.loads(child.stdout.strip().splitlines()[-1])
    llm = LLM.from_engine(LLMEngine(EngineConfig(max_num_batched_tokens=24), loaded=default_model))
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert fused == [o.outputs[0].token_ids for o in outs]
