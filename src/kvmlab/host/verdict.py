"""The last doctor verdict, recorded for `status`: <state>/host/last-doctor.json.

Every doctor run writes it, standalone (`invoke doctor`) or as the lab's step: when it ran, who
ran it, the verdict, whether KVM is usable, and the host's stable facts (CPU, VMX/SVM,
hypervisor, modules, /dev/kvm, KVM API version; ``DoctorReport.facts``). `status` shows the
newest of this record and the lab's doctor stamp. A record that cannot be read is simply absent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmlab.core.fsutil import atomic_write_json, read_json
from kvmlab.core.records import utc_stamp
from kvmlab.host.doctor import DoctorReport

SCHEMA = 1


def record_path(state_dir: Path) -> Path:
    return state_dir / "host" / "last-doctor.json"


def make_record(rep: DoctorReport, source: str, now: float | None = None) -> dict[str, Any]:
    """The record of one doctor run; ``source`` says who ran it (doctor, lab)."""
    return {"schema": SCHEMA, "time": utc_stamp(now),
            "source": source, "verdict": rep.verdict, "usable": rep.usable,
            "facts": rep.facts()}


def write_record(state_dir: Path, rep: DoctorReport, source: str) -> Path:
    """Record this verdict (atomically); raises OSError when the state dir is not writable."""
    p = record_path(state_dir)
    atomic_write_json(p, make_record(rep, source))
    return p


def read_record(state_dir: Path) -> dict[str, Any] | None:
    """The recorded verdict with its path, or None (missing, unreadable, another schema)."""
    p = record_path(state_dir)
    try:
        data = read_json(p, None)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or "verdict" not in data:
        return None
    return {**data, "path": str(p)}


def newest(*records: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record with the latest ``time`` (ISO 8601 UTC strings sort by time); None if none."""
    found = [r for r in records if r]
    return max(found, key=lambda r: str(r.get("time") or "")) if found else None
