"""The CPU decode-attention kernel (csrc/paged_decode.cpp), built on first use.

torch's C++ extension loader compiles it once per machine into the kvtier cache
directory (about 30 s here); later processes load the built library. Without a
compiler the engine keeps the torch path, and says so.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
STALE_LOCK_S = 600.0  # a build takes about 30 s


def _cpu_tag() -> str:
    """Built with -march=native, so the build is only valid on the CPU it was made for."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:10]


@functools.cache
def load():
    """The compiled module, or None if it cannot be built here."""
    from kvtier.engine.core.paths import cache_dir
    try:
        from torch.utils import cpp_extension
        build = cache_dir() / "torch_extensions" / f"paged_decode_{_cpu_tag()}"
        build.mkdir(parents=True, exist_ok=True)
        lock = build / "lock"
        # torch's loader waits for this lock without end; a build killed half way leaves it.
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            logger.warning("removing a stale build lock %s", lock)
            lock.unlink(missing_ok=True)
        logger.info("loading the CPU decode-attention kernel (the first build takes about 30 s)")
        return cpp_extension.load(
            name="kvtier_paged_decode", sources=[str(SOURCE)], build_directory=str(build),
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path still works
        logger.warning("CPU decode-attention kernel unavailable (%s: %s); using the torch path",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
