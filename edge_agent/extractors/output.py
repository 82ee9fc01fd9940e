"""What an extractor may put into a DID's metadata: a JSON object of scalars under lake-safe keys.

Rucio keeps generic metadata as JSON and lists DIDs by it in filter expressions (`key=value`): a
key is kept to lower-case letters, digits, `_` and `-` (FITS keywords arrive lower-cased the same
way), and never one of the DID's own columns (`bytes`, `adler32`, `name`...), which describe the
file as the agent measured it. Values are strings, numbers or booleans: a nested value or null is
refused rather than stored in a form nobody can filter on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from ..errors import ExtractorFailed
from ..lake.base import PROTECTED_META_KEYS

KEY_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
MAX_KEYS = 100
MAX_STRING = 1024                 # characters of one string value
MAX_OUTPUT_BYTES = 64 << 10       # the object as JSON (and a command's stdout)
_INT64 = 1 << 63

Scalar = str | int | float | bool


def check(data: object) -> dict[str, Scalar]:
    """`data` as metadata, or ExtractorFailed saying what is wrong with it (the first problems)."""
    if not isinstance(data, Mapping):
        raise ExtractorFailed(f"its output is {_kind(data)}, not a JSON object")
    if len(data) > MAX_KEYS:
        raise ExtractorFailed(f"its output has {len(data)} keys (at most {MAX_KEYS})")
    problems = [p for k, v in data.items() if (p := _problem(k, v))]
    if problems:
        raise ExtractorFailed("its output is refused: " + "; ".join(problems[:3])
                              + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    out = dict(data)
    size = len(json.dumps(out).encode())
    if size > MAX_OUTPUT_BYTES:
        raise ExtractorFailed(f"its output is {size} bytes as JSON (at most {MAX_OUTPUT_BYTES})")
    return out


def _problem(key: object, value: object) -> str | None:
    if not isinstance(key, str) or not KEY_RE.match(key):
        return (f"key {key!r}: use 1-64 lower-case letters, digits, '_' and '-', starting with a letter")
    if key in PROTECTED_META_KEYS:
        return f"key {key!r}: a column of the DID itself, set by the agent or the lake"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else f"{key}: the integer does not fit 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{key}: {value} is not a JSON number"
    if isinstance(value, str):
        return None if len(value) <= MAX_STRING else f"{key}: a string of {len(value)} characters " \
                                                     f"(at most {MAX_STRING})"
    if value is None:
        return f"{key}: null (leave the key out when there is no value)"
    return f"{key}: {_kind(value)}, not a string, number or boolean"


def _kind(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, Mapping):
        return "an object"
    if isinstance(v, (list, tuple)):
        return "an array"
    return f"a {type(v).__name__}"
