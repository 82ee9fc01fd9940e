"""Every key of the settings model, as an operator writes it, with its type, default and
environment variable in the words docs/configuration.md uses (the docs test compares them)."""

from __future__ import annotations

import datetime as dt
import enum
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from edge_agent.settings import ENV_PREFIX


def _unwrap(t: Any) -> Any:
    """X | None -> X."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(t) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return t


def _model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def settings_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) for every leaf: nested tables recurse, dict tables are NAME, arrays of
    tables are KEY[] (windows[].start)."""
    for name, field in model.model_fields.items():
        t = _unwrap(field.annotation)
        origin, args = typing.get_origin(t), typing.get_args(t)
        if _model(t):
            yield from settings_keys(t, f"{prefix}{name}.")
        elif origin is dict and _model(args[1]):
            yield from settings_keys(args[1], f"{prefix}{name}.NAME.")
        elif origin is list and _model(args[0]):
            yield from settings_keys(args[0], f"{prefix}{name}[].")
        else:
            yield prefix + name, field


def _value(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (Path, dt.time)):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def default_text(field: FieldInfo) -> str:
    """The default as TOML would write it; `required` or `not set` when there is none."""
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "not set"
    v = _value(field.default)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{}" if not v else json.dumps(v)
    return json.dumps(v)


def env_name(key: str) -> str:
    if key.startswith("windows[]."):
        return f"{ENV_PREFIX}WINDOWS"   # the whole array, as JSON
    return ENV_PREFIX + key.replace(".", "__").replace("NAME", "<NAME>").upper()


def type_text(field: FieldInfo) -> str:
    t = _unwrap(field.annotation)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        text = "one of " + ", ".join(f"`{a}`" for a in args)
    elif isinstance(t, type) and issubclass(t, enum.Enum):
        text = "one of " + ", ".join(f"`{m.value}`" for m in t)
    elif origin is list:
        inner = args[0]
        text = "list of " + (", ".join(f"`{m.value}`" for m in inner) if issubclass(inner, enum.Enum)
                             else "strings")
    elif origin is dict:
        text = "table of strings"
    else:
        text = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path",
                SecretStr: "secret string", dt.time: "time `HH:MM`"}[t]
    bounds = []
    for m in field.metadata:
        if isinstance(m, Ge):
            bounds.append(f">= {m.ge}")
        elif isinstance(m, Gt):
            bounds.append(f"> {m.gt}")
        elif isinstance(m, Le):
            bounds.append(f"<= {m.le}")
    return f"{text}{', ' + ', '.join(bounds) if bounds else ''}"
