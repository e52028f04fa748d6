"""The record of the last lab run: its step timeline, how it ended and the checks run after it.

``<state>/lab/run.json`` is rewritten (atomically) after every step, so a run that failed or was
interrupted still says how far it got::

    {"schema": 1, "started": EPOCH, "finished": EPOCH | null, "host", "recipe", "builder",
     "options": {...}, "steps": [{"step", "status", "started", "seconds", "figure"}],
     "failed": STEP | null, "error": {"message", "hint"} | null,
     "checks": [{"host", "step", "name", "status", "message"}] | null, "checks_at": EPOCH}

``invoke report`` (kvmlab.report) draws the timeline and the checks table from it. A file this
kvmlab cannot read (missing, damaged, another schema) reads as None: there is no run to show.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvmlab.core.errors import KvmlabError
from kvmlab.core.fsutil import atomic_write_json, read_json
from kvmlab.core.settings import Settings
from kvmlab.lab.steps import LabOptions, StepOutcome

SCHEMA = 1


def path(settings: Settings) -> Path:
    return settings.state_dir / "lab" / "run.json"


class RunLog:
    """The run.json of one run_lab, written after every step."""

    def __init__(self, settings: Settings, opts: LabOptions):
        self.path = path(settings)
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "started": round(time.time(), 3), "finished": None,
            "host": platform.node(),
            "recipe": opts.recipe, "builder": opts.builder,
            "options": {k: v for k, v in asdict(opts).items() if k != "force"},
            "steps": [], "failed": None, "error": None, "checks": None}

    def step(self, out: StepOutcome, started: float) -> None:
        self.doc["steps"].append({"step": out.step, "status": out.status,
                                  "started": round(started, 3),
                                  "seconds": round(out.seconds, 3), "figure": out.figure})
        self.save()

    def failed(self, step: str, error: KvmlabError) -> None:
        self.doc["failed"] = step
        self.doc["error"] = {"message": error.message, "hint": error.hint}
        self.finish()

    def finish(self) -> None:
        self.doc["finished"] = round(time.time(), 3)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.doc)


def add_checks(settings: Settings, results: Iterable[Mapping[str, Any]]) -> None:
    """Record the checks a lab run ran after its steps (kvmlab.lab.verify results)."""
    doc = read(settings)
    if doc is None:
        return
    doc["checks"] = [dict(r) for r in results]
    doc["checks_at"] = round(time.time(), 3)
    atomic_write_json(path(settings), doc)


def read(settings: Settings) -> dict[str, Any] | None:
    try:
        doc = read_json(path(settings), None)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or \
            not isinstance(doc.get("steps"), list):
        return None
    return doc
