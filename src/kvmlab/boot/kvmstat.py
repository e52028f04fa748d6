"""KVM's own exit counter as evidence that a boot really ran under KVM.

``/sys/kernel/debug/kvm/exits`` (debugfs mounted) is the sum of the VM exits of every *live* VM
of this kernel's KVM: a VM's exits vanish from it when the VM is destroyed. So the counter is
read before qemu starts and sampled while it runs (the highest reading kept); the difference is
the exits of the boot. ``None`` everywhere means the counter is not readable here (no debugfs,
no KVM module, not root): no evidence either way.
"""
from __future__ import annotations

import time
from pathlib import Path

EXITS = Path("/sys/kernel/debug/kvm/exits")
SAMPLE_EVERY = 0.2


def read_exits(path: Path = EXITS) -> int | None:
    """The counter's value, None when it cannot be read."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class ExitCounter:
    """``start()`` before the launch, ``sample()`` while the VM runs, ``delta`` afterwards."""

    def __init__(self, path: Path = EXITS):
        self.path = path
        self.before: int | None = None
        self.highest: int | None = None
        self._last = 0.0

    def start(self) -> None:
        self.before = read_exits(self.path)
        self.highest = self.before

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.before is None or (not force and now - self._last < SAMPLE_EVERY):
            return
        self._last = now
        v = read_exits(self.path)
        if v is not None and (self.highest is None or v > self.highest):
            self.highest = v

    @property
    def delta(self) -> int | None:
        if self.before is None or self.highest is None:
            return None
        return max(0, self.highest - self.before)
