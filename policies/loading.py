"""Load a user's object from a module path, the way vLLM loads connectors."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _import(module_path: str) -> ModuleType:
    if module_path.endswith(".py") or "/" in module_path:
        path = Path(module_path)
        name = f"_kvtier_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load a module from {module_path!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(module_path)


def load_object(module_path: str, name: str | None = None):
    """`module_path` is a dotted module or a .py file, optionally ending in
    ':Name'; without it, `name` says which attribute to take."""
    module_part, _, attr = module_path.partition(":")
    attr = attr or name
    if not attr:
        raise ValueError(f"{module_path!r} names no object: use 'module:Name'")
    module = _import(module_part)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{module_part!r} has no attribute {attr!r}") from None
