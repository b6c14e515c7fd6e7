"""`kvtier`: a bad flag or configuration ends with one line naming it, status 2.

All of these fail before a model is loaded, so they run in-process and fast."""
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.engine.entrypoints.cli import build_parser, engine_config_from_args, main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["serve", "--max-model-len", "4"], "--max-model-len"),
    (["serve", "--max-model-len", "many"], "--max-model-len"),
    (["serve", "--block-size", "0"], "--block-size"),
    (["serve", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["serve", "--num-gpu-blocks-override", "0"], "--num-gpu-blocks-override"),
    (["serve", "--dtype", "int3"], "--dtype"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--block-size", "64", "--max-num-batched-tokens", "32"], "max_num_batched_tokens"),
    (["serve", "--kv-transfer-config", '{"kv_role": "leader"}'], "kv_transfer_config.kv_role"),
    (["serve", "--kv-transfer-config", '{"kv_conector": "X"}'], "kv_transfer_config.kv_conector"),
    (["serve", "--kv-transfer-config", "{not json"], "kv_transfer_config: invalid JSON"),
    (["serve", "--kv-transfer-config", "@/nonexistent/kv.json"], "/nonexistent/kv.json"),
    (["serve", "a.gguf", "--model", "b.gguf"], "--model"),
    (["serve", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["serve", "--no-such-flag"], "--no-such-flag"),
    (["store", "--cpu-bytes", "0"], "cpu_bytes"),
    (["store", "--eviction-policy", "mru"], "eviction_policy"),
    (["store", "--fs-bytes", "100"], "fs_bytes needs fs_path"),
    (["store", "--config", "/nonexistent/store.json"], "/nonexistent/store.json"),
    (["store", "--token-file", "/nonexistent/token"], "token_file"),
])
def test_bad_input_exits_2_with_one_line_naming_it(capsys, argv, named):
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert named in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_flags_map_to_engine_config():
    args = build_parser().parse_args([
        "serve", "my.gguf", "--max-model-len", "512", "--block-size", "32", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "256", "--num-gpu-blocks-override", "100", "--gpu-memory-utilization", "0.5",
        "--no-enable-prefix-caching", "--served-model-name", "a", "b", "--dtype", "float32", "--seed", "7",
        "--kv-transfer-config", '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}'])
    config = engine_config_from_args(args)
    assert (config.model, config.max_model_len, config.block_size, config.max_num_seqs) == ("my.gguf", 512, 32, 4)
    assert (config.max_num_batched_tokens, config.num_gpu_blocks_override) == (256, 100)
    assert (config.gpu_memory_utilization, config.enable_prefix_caching) == (0.5, False)
    assert (config.served_model_name, config.dtype, config.seed) == (["a", "b"], "float32", 7)
    assert config.kv_transfer_config.kv_connector == "OffloadingConnector"


def test_unset_flags_keep_engine_defaults():
    from kvtier.engine.config import EngineConfig
    config = engine_config_from_args(build_parser().parse_args(["serve"]))
    assert config == EngineConfig()
    args = build_parser().parse_args(["serve", "--model", "x.gguf"])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert engine_config_from_args(args).model == "x.gguf"


def test_version_as_a_command():
    out = subprocess.run([sys.executable, "-m", "kvtier", "--version"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.startswith("kvtier ")
