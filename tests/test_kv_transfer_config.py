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
        "engine_id": "e1", "kv_connector_module_path": "my.module", "kv_load_failure_policy": "fail"})
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
