"""The connector framework without any tier: registry, config errors, an
out-of-tree connector loaded by module path, sync loads through the scheduler."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints.llm import LLM
from kvtier.engine.llm_engine import LLMEngine

sys.path.insert(0, str(Path(__file__).parent / "examples"))

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
LONG = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(40))


def engine_with(loaded, ktc, **kw) -> LLM:
    return LLM.from_engine(LLMEngine(EngineConfig(kv_transfer_config=ktc, **kw), loaded=loaded))


def test_out_of_tree_connector_by_module_path(default_model):
    ktc = {"kv_connector": "DictConnector", "kv_role": "kv_both", "kv_connector_module_path": "dict_connector"}
    llm = engine_with(default_model, ktc)
    cold = llm.generate([LONG], GREEDY, use_tqdm=False)[0]
    assert type(llm.engine.connector).__name__ == "DictConnector"
    assert llm.engine.kv_cache_manager.pool.reset_prefix_cache()  # the device cache forgets everything
    warm = llm.generate([LONG], GREEDY, use_tqdm=False)[0]
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    n = len(warm.prompt_token_ids)
    assert warm.num_cached_tokens == (n - 1) // 16 * 16 > 0


def test_docs_show_the_example_connector():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = (Path(__file__).parent / "examples" / "dict_connector.py").read_text()
    body = example[example.index("class DictConnector"):]
    assert body.strip() in readme  # the README's example is the tested one


@pytest.mark.parametrize("ktc, field", [
    ({"kv_connector": "NoSuchConnector", "kv_role": "kv_both"}, "OffloadingConnector"),
    ({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"cpu_bytes_to_use": -5}}, "cpu_bytes_to_use"),
    ({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"block_size": 24}}, "block_size"),
    ({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"secondary_tiers": [{"type": "fs", "path": "/tmp/x"}]}}, "spec_name"),
    ({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"eviction_policy": "nope"}}, "nope"),
    ({"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {}}, "connectors"),
    ({"kv_connector": "DictConnector", "kv_role": "kv_both", "kv_connector_module_path": "no_such_module_xyz"},
     "no_such_module_xyz"),
])
def test_bad_connector_config_names_the_field(default_model, ktc, field):
    with pytest.raises((ValueError, ImportError), match=field):
        engine_with(default_model, ktc, num_gpu_blocks_override=64)
