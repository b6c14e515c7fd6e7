"""Where kvtier keeps its files: the default model, digests, built kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$KVTIER_CACHE, else ~/.cache/kvtier."""
    return Path(os.environ.get("KVTIER_CACHE") or Path.home() / ".cache" / "kvtier").expanduser().absolute()
