"""Configuration errors in one voice: the field named by its dotted path, the
message without pydantic's boilerplate, and for an unknown key the closest
known one ("did you mean root_dir?").

It sits in kvstore, the lowest package that validates configuration (tier
specs); connectors (--kv-transfer-config) and the engine (flags, requests)
use the same helper.
"""
from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration the user wrote is wrong. `field` is its dotted path."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def known_keys(model: type[BaseModel]) -> set[str]:
    """Field names and aliases of `model` and of every model nested in it."""
    seen: set[type] = set()
    keys: set[str] = set()

    def walk(tp) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.add(tp)
            for name, field in tp.model_fields.items():
                keys.add(name)
                for alias in (field.alias, field.validation_alias):
                    if isinstance(alias, str):
                        keys.add(alias)
                    elif alias is not None and hasattr(alias, "choices"):
                        keys.update(c for c in alias.choices if isinstance(c, str))
                walk(field.annotation)
        for arg in typing.get_args(tp):
            walk(arg)

    walk(model)
    return keys


def describe(err: dict, prefix: Sequence[str] = (), known: Iterable[str] = (), skip: int = 0) -> tuple[str | None, str]:
    """(dotted field path, message) for one pydantic error. `skip` drops leading
    loc parts that are not field names (FastAPI's "body"); `prefix` goes first."""
    loc = [str(part) for part in err.get("loc", ())[skip:]]
    path = ".".join([*prefix, *loc]) or None
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = str(err["ctx"]["error"])  # without pydantic's "Value error, " prefix
    elif err["type"] == "extra_forbidden":
        msg = "unknown field"
        close = difflib.get_close_matches(loc[-1] if loc else "", sorted(set(known)), n=1, cutoff=0.6)
        if close:
            msg += f" (did you mean {close[0]}?)"
    return path, f"{path}: {msg}" if path else msg


def validate(model: type[BaseModel], data: Any, where: Sequence[str] = ()):
    """model.model_validate(data), or a ConfigError naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        path, message = describe(e.errors()[0], where, known_keys(model))
        raise ConfigError(message, path) from None
