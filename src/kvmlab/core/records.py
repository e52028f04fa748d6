"""Typed records as JSON: the one conversion every ``to_dict`` of a result record uses, and the
one timestamp format records carry (``utc_stamp``).

A dataclass becomes a dict of its fields (recursively), a record with its own ``to_dict`` is
asked for it, paths become strings, tuples and sets lists; the rest is left to json.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any


def utc_stamp(seconds: float | None = None) -> str:
    """A time (default: now) as ISO 8601 UTC to the second, as records carry it:
    2024-05-01T12:00:00Z (such strings sort by time)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def to_jsonable(obj: Any, *, _top: bool = True) -> Any:
    """``obj`` as plain JSON-able values (the top-level dataclass is walked field by field even
    when it has a to_dict that calls this)."""
    if not _top and hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), _top=False)
                for f in dataclasses.fields(obj)}
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, _top=False) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, _top=False) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
