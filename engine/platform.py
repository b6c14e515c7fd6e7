"""Where the engine runs and how much KV it can hold: the device, the
dtype, and the number of KV cache blocks in the pool."""
from __future__ import annotations

import torch

from kvtier.engine.config import EngineConfig
from kvtier.engine.model.runner import kv_page_bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def pick_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return model_dtype if name == "auto" else DTYPES[name]


def kv_pool_blocks(config: EngineConfig, model_config, groups, max_model_len: int, device: torch.device,
                   dtype: torch.dtype) -> int:
    """Blocks in the pool, the null block included: the override, or what the
    memory budget holds, capped at max_num_seqs full-length requests."""
    if config.num_gpu_blocks_override:
        return config.num_gpu_blocks_override + 1  # plus the null block
    page = kv_page_bytes(model_config, groups, config.block_size, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.gpu_memory_utilization)
    else:
        budget = int(config.cpu_kv_cache_bytes * config.gpu_memory_utilization)
    # No point in holding more than max_num_seqs full-length requests.
    cap = config.max_num_seqs * len(groups) * -(-max_model_len // config.block_size) + 1
    return max(2, min(budget // page, cap))
