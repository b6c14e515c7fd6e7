"""--kv-transfer-config: vLLM's shape parses unchanged; mistakes name the field."""
import json

import pytest

from kvtier.connectors.config import KVTransferConfig, parse_kv_transfer_config

# The example from vLLM's OffloadingConnector documentation, verbatim.
VLLM_OFFLOADING_CONFIG = (
    '{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":'
    '{"spec_name":"TieringOffloadingSpec","cpu_bytes_to_use":10000000000,"secondary_tiers":'
    '[{"type":"obj","bucket":"your-bucket","endpoint_override":"your-s3-endpoint:9000",'
    '"access_key":"YOUR_ACCESS_KEY","secret_key":"YOUR_SECRET_KEY","scheme":"http"}]}}'
)


def test_vllm_offloading_config_parses_unchanged():
    config = parse_kv_transfer_config(VLLM_OFFLOADING_CONFIG)
    assert config.kv_connector == "OffloadingConnector"
    assert config.kv_role == "kv_both"
    assert config.kv_connector_extra_config == json.loads(VLLM_OFFLOADING_CONFIG)["kv_connector_extra_config"]
    assert config.kv_load_failure_policy == "recompute"
    assert config.is_kv_producer and config.is_kv_consumer
    assert config.get_from_extra_config("spec_name") == "TieringOffloadingSpec"
    assert config.engine_id  # generated, as vLLM does


def test_file_dict_and_model_inputs(tmp_path):
    path = tmp_path / "kv.json"
    path.write_text(VLLM_OFFLOADING_CONFIG)
    from_file = parse_kv_transfer_config(f"@{path}")
    assert from_file.kv_connector_extra_config["cpu_bytes_to_use"] == 10_000_000_000
    from_dict = parse_kv_transfer_config(json.loads(VLLM_OFFLOADING_CONFIG))
    assert from_dict.kv_connector == "OffloadingConnector"
    assert parse_kv_transfer_config(from_dict) is from_dict
    assert parse_kv_transfer_config(None) is None


def test_vllm_compatibility_fields_are_accepted():
    config = parse_kv_transfer_config({
        "kv_connector": "X", "kv_role": "kv_producer", "kv_rank": 0, "kv_parallel_size": 2,
        "kv_ip": "10.0.0.1", "kv_port": 1234, "kv_buffer_device": "cpu", "kv_buffer_size": 1e6,
        "engine_id": "e1", "kv_connector_module_path": "my.module", "kv_load_failure_policy": "fail"},
        check_connector=False)  # my.module is nowhere to be found
    assert (config.kv_port, config.engine_id, config.kv_load_failure_policy) == (1234, "e1", "fail")
    assert config.is_kv_producer and not config.is_kv_consumer


@pytest.mark.parametrize("value, expected", [
    ('{"kv_connector":"X","kv_role":"both"}', "kv_transfer_config.kv_role: Input should be"),
    ('{"kv_connector":"X"}', "kv_transfer_config.kv_role: must be set"),
    ('{"kv_conector":"X"}', "kv_transfer_config.kv_conector: unknown field"),
    ('{"kv_role":"kv_both","kv_load_failure_policy":"retry"}', "kv_transfer_config.kv_load_failure_policy"),
    ('{"kv_role":"kv_both","kv_port":"x"}', "kv_transfer_config.kv_port"),
    ('{"kv_role":"kv_both","kv_connector_extra_config":[]}', "kv_transfer_config.kv_connector_extra_config"),
    ('{"kv_role": ', "kv_transfer_config: invalid JSON"),
    ("[1, 2]", "kv_transfer_config: expected a JSON object"),
    ("@/nonexistent/kv.json", "kv_transfer_config: cannot read /nonexistent/kv.json"),
])
def test_errors_name_the_field(value, expected):
    with pytest.raises(ValueError) as info:
        parse_kv_transfer_config(value)
    assert str(info.value).startswith(expected)


def test_unknown_top_level_field_is_rejected_by_the_model_too():
    with pytest.raises(ValueError):
        KVTransferConfig(kv_role="kv_both", kv_rol="x")


# Every key of vLLM's OffloadingConnector documentation (vLLM 0.33), with a value.
EVERY_VLLM_KEY = {
    "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 50_000_000, "blocks_per_chunk": 4,
    "eviction_policy": "lru", "store_threshold": 0, "max_tracker_size": 1000, "offload_prompt_only": True,
    "self_describing_kv_events": True, "tier_poll_interval_s": 0.001, "sync_load_budget_bytes": 0,
    "canonical_layout": False, "backpressure": {"backpressure_cls": "EMABackpressureDetector"},
    "secondary_tiers": [{"type": "fs", "root_dir": "ROOT", "n_read_threads": 4, "n_write_threads": 4,
                         "enable_kv_events": True, "locality": "LOCAL",
                         "backpressure": {"backpressure_cls": "EMABackpressureDetector", "high_water_s": 0.01}}],
}


def test_every_vllm_offloading_key_starts_an_engine(default_model, tmp_path):
    from kvtier.engine.config import EngineConfig
    from kvtier.engine.llm_engine import LLMEngine
    extra = json.loads(json.dumps(EVERY_VLLM_KEY).replace("ROOT", str(tmp_path / "fs")))
    ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra,
           "kv_load_failure_policy": "fail"}
    engine = LLMEngine(EngineConfig(kv_transfer_config=ktc, num_gpu_blocks_override=64), loaded=default_model)
    try:
        c = engine.connector
        assert c.offload_tokens == 4 * engine.block_size  # blocks_per_chunk: device blocks per offload block
        assert c.seen.capacity == 1000 and c.cfg.offload_prompt_only
        fs = c.store.tiers["fs"]
        assert (fs.backend.read_threads, fs.backend.write_threads) == (4, 4)
        assert engine.scheduler.load_failure_policy == "fail"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("extra, message", [
    ({"secondary_tiers": [{"type": "fs", "root_dirr": "/x"}], "spec_name": "TieringOffloadingSpec"},
     "secondary_tiers.0.root_dirr: unknown field (did you mean root_dir?)"),
    ({"cpu_bytes_to_uze": 5}, "kv_connector_extra_config.cpu_bytes_to_uze: unknown field (did you mean cpu_bytes_to_use?)"),
    ({"block_size": 32, "blocks_per_chunk": 2}, "block_size or blocks_per_chunk"),
    ({"spec_name": "NPUOffloadingSpec"}, "spec_module_path"),
])
def test_a_bad_extra_config_is_a_config_error_before_any_model_loads(extra, message):
    from kvtier.engine.config import EngineConfig
    from kvtier.kvstore.validation import ConfigError
    ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}
    with pytest.raises(ConfigError, match=None) as info:
        parse_kv_transfer_config(ktc)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="did you mean|not both|spec_module_path|block_size or"):
        EngineConfig(kv_transfer_config=ktc, model="/nonexistent")  # the model is never looked at


def test_out_of_tree_tier_and_spec_by_module_path(default_model):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent / "examples"))
    import dict_tier

    from kvtier.engine.config import EngineConfig
    from kvtier.engine.core.sampling_params import SamplingParams
    from kvtier.engine.entrypoints.llm import LLM
    from kvtier.engine.llm_engine import LLMEngine
    ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": {
        "spec_name": "CountingSpec", "spec_module_path": "dict_tier", "cpu_bytes_to_use": 50_000_000,
        "block_size": 64, "secondary_tiers": [{"type": "DictTier", "module_path": "dict_tier"}]}}
    prompt = " ".join(f"Row {i}: {i * 3}." for i in range(60))
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    first = LLMEngine(EngineConfig(kv_transfer_config=ktc), loaded=default_model)
    cold = LLM.from_engine(first).generate([prompt], sp, use_tqdm=False)[0]
    assert first.connector.store.flush(30) and dict_tier.OBJECTS
    first.shutdown()
    second = LLMEngine(EngineConfig(kv_transfer_config=ktc), loaded=default_model)  # empty CPU tier
    warm = LLM.from_engine(second).generate([prompt], sp, use_tqdm=False)[0]
    second.shutdown()
    assert warm.num_cached_tokens > 0 and warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert dict_tier.CountingSpec.built == 2
