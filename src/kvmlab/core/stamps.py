"""The one "unchanged inputs" record: a step is skipped when its inputs hash to what it recorded.

    st = Stamp(settings.work(recipe) / "build-debian12.stamp.json", "build")
    record = st.fresh(inputs)          # the record written last time, or None (redo the step)
    ...
    st.write(inputs, record)           # atomically, after the step's outputs are in place

``inputs`` is any JSON-able mapping (recipe hash, source sha256, image id, options); it is
hashed canonically (kvmlab.core.fsutil.json_sha256). The file holds ``{"schema", "step",
"inputs_sha256", "inputs", "record"}``; a missing, unreadable or older-schema file is simply not
fresh, so the step runs again — never an error.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core.fsutil import atomic_write_json, json_sha256, read_json

SCHEMA = 1


@dataclass(frozen=True)
class Stamp:
    path: Path
    step: str

    def read(self) -> dict[str, Any] | None:
        try:
            data = read_json(self.path, None)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or \
                data.get("step") != self.step:
            return None
        return data

    def fresh(self, inputs: Mapping[str, Any]) -> Any | None:
        """The recorded record when ``inputs`` are unchanged since the last write, else None."""
        data = self.read()
        if data is None or data.get("inputs_sha256") != json_sha256(dict(inputs)):
            return None
        return data.get("record")

    def write(self, inputs: Mapping[str, Any], record: Any = None) -> None:
        atomic_write_json(self.path, {"schema": SCHEMA, "step": self.step,
                                      "inputs_sha256": json_sha256(dict(inputs)),
                                      "inputs": dict(inputs), "record": record})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
