"""The nested lab's typed records: what `invoke nested` was asked to do and what it found.

``NestedRecord`` is written to ``STATE/nested/<run>/record.json`` (and, with ``lab --nested``,
into lab.lock.json under "nested"): the lab VM's kernel, the modules loaded in it (names,
vermagic, from which files), the doctor's verdict inside, the nested boot's accelerator and KVM
exit count, and the times of each part. A failed run writes the record too, with ``failed`` (the
step) and ``error`` set, so the run directory always says what happened.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core.errors import KvmlabError
from kvmlab.core.fsutil import atomic_write_json

MODULE_SOURCES = ("built", "distro")
DEFAULT_KMOD_RECIPE = "kvm-kmod-6.1"
DEFAULT_QEMU_RECIPE = "qemu-kvm-0.12.1.2"
DEFAULT_TIMEOUT = 600.0
SCHEMA = 1


class NestedError(KvmlabError):
    """The nested lab could not be set up, or a step inside the lab VM failed."""


@dataclass(frozen=True)
class NestedOptions:
    recipe: str = DEFAULT_KMOD_RECIPE            # the kmod recipe (its target kernel boots)
    qemu_recipe: str = DEFAULT_QEMU_RECIPE       # the qemu-kvm build run inside
    builder: str = "debian12"
    modules: str = "built"                       # built: our .ko files; distro: the kernel's
    cpu: str = "max"                             # the lab VM's -cpu (TCG emulates SVM with max)
    timeout: float = DEFAULT_TIMEOUT             # the whole run, lab VM boot included
    keep: bool = False                           # leave the lab VM up (ssh command printed)
    memory: int = 2048
    kernel_release: str | None = None            # boot this kernel instead of the recipe's


@dataclass
class ModuleLoaded:
    name: str                 # as the kernel names it (kvm_amd)
    file: str                 # the .ko it came from (inside the lab VM)
    vermagic: str
    source: str               # built (our kmod build) / kernel package
    taint: str = ""           # /sys/module/<name>/taint inside (O: out of tree, E: unsigned)


@dataclass
class NestedTimes:
    lab_vm_boot: float = 0.0  # launch -> sshd answers
    push: float = 0.0         # bundle + build outputs into the lab VM
    module_load: float = 0.0
    doctor: float = 0.0
    install: float = 0.0      # install + install-bios inside
    nested_boot: float = 0.0  # boot-test --accel kvm inside (the whole call)
    verify: float = 0.0       # testinfra against the lab VM
    total: float = 0.0


@dataclass
class NestedRecord:
    run: str
    run_dir: str
    options: dict[str, Any]
    schema: int = SCHEMA
    kernel: dict[str, str] = field(default_factory=dict)    # release, package_version, vmlinuz
    cpu: dict[str, Any] = field(default_factory=dict)       # vendor, vmx, svm inside
    modules: list[ModuleLoaded] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)   # module -> why (from CPUID)
    verdict: str = ""                                       # the doctor's, inside
    usable: bool = False
    backend: str = ""                                       # the doctor's KVM backend line
    accel: str = ""                                         # the nested boot's, from the monitor
    kvm_exits: int | None = None
    nested_seconds: float | None = None                     # nested boot: launch -> marker
    qemu_version: str = ""
    verified: dict[str, str] = field(default_factory=dict)  # check -> status
    times: NestedTimes = field(default_factory=NestedTimes)
    steps: dict[str, str] = field(default_factory=dict)     # step -> its output log
    dmesg: str = ""                                         # path of the kernel log kept
    loaded_after_failure: list[str] = field(default_factory=list)
    ssh: str = ""                                           # --keep: how to get in
    failed: str = ""                                        # the step that failed
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lock_entry(self) -> dict[str, Any]:
        """What lab.lock.json keeps under "nested": the stable facts, no paths of this run."""
        d = self.to_dict()
        for k in ("run_dir", "steps", "dmesg", "ssh", "loaded_after_failure", "verified"):
            d.pop(k, None)
        return d

    def write(self) -> Path:
        p = Path(self.run_dir) / "record.json"
        atomic_write_json(p, self.to_dict())
        return p
