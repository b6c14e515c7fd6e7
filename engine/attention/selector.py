"""Which attention kernel a model runs: Triton on CUDA, the C++ decode
kernel on the CPU, or pure torch."""
from __future__ import annotations

import logging
import os

from kvtier.engine.attention.paged import paged_attention_fused

logger = logging.getLogger("kvtier.engine")


def choose_attention(model, runner, device) -> None:
    """Triton on CUDA, the C++ decode kernel on the CPU; KVTIER_ATTENTION=
    triton|cpu|torch overrides (triton on the CPU needs TRITON_INTERPRET=1 and
    is how the wiring is tested without a GPU; torch is the pure-torch path)."""
    choice = os.environ.get("KVTIER_ATTENTION", "auto")
    if choice not in ("auto", "torch", "cpu", "triton"):
        raise ValueError(f"KVTIER_ATTENTION={choice!r}: expected auto, torch, cpu or triton")
    if choice == "torch":
        return
    if choice == "cpu" and device.type != "cpu":
        raise ValueError("KVTIER_ATTENTION=cpu needs --device cpu")
    if choice == "cpu" or (choice == "auto" and device.type == "cpu"):
        from kvtier.engine.attention import cpu_kernel
        runner.decode_kernel = cpu_kernel.load()
        if runner.decode_kernel is None and choice == "cpu":
            raise RuntimeError("KVTIER_ATTENTION=cpu but the CPU kernel could not be built (see the log)")
        return
    if choice == "auto" and device.type != "cuda":
        return
    from kvtier.engine.attention import triton_kernel
    if not triton_kernel.is_available():
        if choice == "triton":
            raise RuntimeError("KVTIER_ATTENTION=triton but triton cannot run here "
                               "(install triton; on the CPU set TRITON_INTERPRET=1)")
        logger.warning("triton is not usable: using the torch attention path")
        return
    model.attention = paged_attention_fused
    runner.fused_attention = True
