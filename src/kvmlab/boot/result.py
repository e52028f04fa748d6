"""What one boot-test run found: the BootResult record (also what verify's checks read)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BootResult:
    booted: bool
    accel: str                    # what the monitor said: "kvm" / "tcg" ("" if never asked)
    seconds: float | None         # launch -> marker
    serial_log: Path
    warnings: list[str] = field(default_factory=list)
    qemu_version: str = ""
    command: list[str] = field(default_factory=list)
    guest: str = ""
    qemu: str = ""
    accel_reason: str = ""        # why this accelerator was chosen
    facts: dict[str, str] = field(default_factory=dict)
    failure: str = ""             # why booted is False
    wall_seconds: float = 0.0     # whole boot_test call
    run_dir: Path | None = None
    name: str = ""                # -name of the qemu process (unique per run)
    pidfile: Path | None = None
    marker: str = ""
    disk: Path | None = None
    disk_size: int | None = None
    disk_format: str = ""
    disk_qemu_img: str = ""       # the qemu-img that made or read the disk (its checks use it)
    powered_off: bool = False     # qemu exited by itself after the marker
    evidence: str = ""            # user ISO: what showed that the boot loader ran
    kvm_exits: int | None = None  # KVM exits counted during the boot (debugfs); None: unreadable

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    def serial_tail(self, lines: int = 15) -> str:
        try:
            text = self.serial_log.read_bytes().decode("utf-8", "replace")
        except OSError:
            return "(no serial log)"
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")
        tail = [ln for ln in text.split("\n") if ln.strip()][-lines:]
        return "\n".join(tail) if tail else "(serial log is empty)"
