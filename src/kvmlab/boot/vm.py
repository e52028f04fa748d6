"""boot-test: launch a test VM headless, prove it booted, report the accelerator really used.

How a boot test runs (the same for qemu-kvm 0.12 and current qemu; flags come from the binary's
own ``-version`` and ``-help``, see ``QemuBinary``):

1. qemu starts *paused* (``-S``) with the serial port written to ``serial.log`` in the run
   directory, stderr to ``qemu.stderr``, a pidfile and ``-name kvmlab-<nonce>``, no network, no
   window (``-display none``, or ``-nographic`` on binaries without ``-display``), ``-no-reboot``.
2. kvmlab connects to the monitor on a unix socket (QMP on qemu >= 1.0, the human monitor on
   older binaries) and asks which accelerator is in use (``query-kvm`` / ``info kvm``) *before*
   the guest runs: the command line is not trusted (qemu-kvm 0.12 silently falls back to
   emulation when KVM cannot be initialised). Then it resumes the guest (``cont``).
3. It polls the serial log for ``KVMLAB-BOOT-OK nonce=<this run's nonce>`` and qemu's stderr for
   "KVM internal error"; the boot time is launch -> marker. After the marker the guest powers
   itself off; qemu is killed (whole process group) on timeout, error, Ctrl-C or SIGTERM.

Accelerator: ``auto`` runs kvmlab.host.doctor.probe_kvm() and asks for KVM only when it says KVM
really runs an unmodified guest, else TCG, and says which and why (``BootResult.accel_reason``);
``kvm`` fails (VMError) when the probe says KVM is not usable, when the monitor says KVM is not
in use after all (qemu-kvm 0.12's silent fallback), or when qemu reports a KVM internal error;
``tcg`` asks for emulation (``-accel tcg``, ``-machine accel=tcg``, or ``-no-kvm`` on qemu-kvm).

``--iso PATH`` (a user's installer ISO) passes when its boot loader was loaded from the CD and
started (a banner on serial, or its El Torito boot image in guest memory: kvmlab.boot.iso).
A VGA screendump (``screen.ppm``) is saved next to the serial log for a human to look at.

The qemu facts, the monitor client and the bounded launch are kvmlab.qemu's; this module only
decides what to boot and what counts as booted.
"""
from __future__ import annotations

import json
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvmlab.boot import guest as guest_mod
from kvmlab.boot import image, watch
from kvmlab.boot.iso import ElTorito, read_el_torito
from kvmlab.boot.marker import marker_for, new_nonce, patch_nonce
from kvmlab.boot.result import BootResult
from kvmlab.core.errors import ImageError, KvmlabError, VMError
from kvmlab.core.fsutil import atomic_write_json
from kvmlab.core.proc import sigterm_as_interrupt
from kvmlab.core.settings import Settings
from kvmlab.host.doctor import KvmProbe, probe_kvm
from kvmlab.install.txn import installed_qemu
from kvmlab.qemu import launch
from kvmlab.qemu.binary import QemuBinary, default_qemu, probe_qemu

ACCELS = ("auto", "kvm", "tcg")
GUESTS = ("tiny", "linux", "iso")
DEFAULT_TIMEOUT = {"tiny": 30.0, "linux": 180.0, "iso": 240.0, "user-iso": 120.0}
DEFAULT_MEMORY = 256
KEEP_RUNS = 20
KERNEL_FORMATS = ("auto", "bzimage", "vmlinux")


def last_path(settings: Settings) -> Path:
    """The last boot-test's results (a list of BootResult records)."""
    return settings.state_dir / "vm" / "last-boot.json"


def runs_dir(settings: Settings) -> Path:
    """Where every boot-test run keeps its directory (result.json, serial log; the newest
    KEEP_RUNS are kept)."""
    return settings.state_dir / "vm" / "runs"


def write_last(settings: Settings, results: list[BootResult]) -> Path:
    """Record the last boot-test run for `invoke verify --step boot` (kvmlab.checks.test_boot)."""
    p = last_path(settings)
    atomic_write_json(p, [r.to_dict() for r in results])
    return p


# --------------------------------------------------------------------------------------------
# Which qemu, which accelerator
# --------------------------------------------------------------------------------------------

_kvm_probe: KvmProbe | None = None


def choose_accel(accel: str) -> tuple[str, str]:
    """(accel to ask for, why). auto: KVM only when the host probe says it really works."""
    if accel not in ACCELS:
        raise VMError(f"unknown accelerator {accel!r}", hint="use auto, kvm or tcg")
    if accel == "tcg":
        return "tcg", "--accel tcg"
    global _kvm_probe
    if _kvm_probe is None:  # once per process (`boot-test` boots two guests); tcg needs none
        _kvm_probe = probe_kvm(timeout=10)
    probe = _kvm_probe
    if accel == "kvm":
        # Refuse up front when the probe (which runs a real guest on /dev/kvm) says KVM cannot
        # run unmodified guests: on such hosts qemu reports "kvm enabled" and then hangs or
        # stops with "KVM internal error" somewhere in the boot, which only looks like a timeout.
        if not probe.usable:
            detail = probe.detail if len(probe.detail) < 300 else probe.detail[:297] + "..."
            raise VMError(f"--accel kvm: KVM is not usable on this host: {probe.verdict}",
                          hint=f"{detail}; use --accel auto (falls back to TCG) or --accel tcg; "
                               "`invoke doctor` explains")
        return "kvm", f"--accel kvm (KVM probe: {probe.verdict})"
    if probe.usable:
        return "kvm", f"auto: KVM probe says usable ({probe.verdict})"
    return "tcg", f"auto: KVM not usable ({probe.verdict}); using TCG"


def _installed(settings: Settings) -> Path | None:
    """The qemu kvmlab installed (kvmlab.install.txn.installed_qemu), None when there is none."""
    try:
        return installed_qemu(settings)
    except (KvmlabError, OSError, ValueError, KeyError, TypeError):
        return None  # no install manifest readable: fall back to PATH


def find_qemu(settings: Settings, qemu: str | Path | None = None) -> QemuBinary:
    """--qemu flag > the installed build > qemu on PATH > the distribution's package; probed."""
    return probe_qemu(qemu or default_qemu(_installed(settings)),
                      cache_dir=settings.cache / "qemu-probe")


# --------------------------------------------------------------------------------------------
# What to boot: the run directory, the disk, the guest's arguments
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _RunDir:
    dir: Path
    nonce: str
    sockdir: Path  # short path: unix sockets <= 108 bytes

    @property
    def name(self) -> str:
        return f"kvmlab-{self.nonce}"

    @property
    def serial(self) -> Path:
        return self.dir / "serial.log"

    @property
    def errlog(self) -> Path:
        return self.dir / "qemu.stderr"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def monitor(self) -> Path:
        return self.sockdir / "monitor.sock"


def _new_run(settings: Settings, kind: str) -> _RunDir:
    nonce = new_nonce()
    runs = runs_dir(settings)
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = runs / (time.strftime("%Y%m%d-%H%M%S") + f"-{kind}-{nonce[:6]}")
    run_dir.mkdir()
    return _RunDir(run_dir, nonce, Path(tempfile.mkdtemp(prefix="kvmlab-vm-")))


def _prune_runs(runs: Path, keep: int = KEEP_RUNS) -> None:
    try:
        dirs = sorted((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    except OSError:
        return
    for d in dirs[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def _prepare_disk(settings: Settings, qb: QemuBinary, run_dir: Path,
                  disk: str | Path | None) -> tuple[Path, str, int, Path]:
    """(disk, format, virtual size, the qemu-img that read or made it)."""
    if disk:
        d = Path(disk).expanduser().resolve()
        if not d.is_file():
            raise VMError(f"disk image not found: {d}", hint="create one: invoke create-image PATH")
        qi = image.find_qemu_img(settings, near=qb.path)
        qv = image.qcow2_version(d)
        if qv is not None and qv >= 3 and qb.version_tuple < (1, 1, 0):
            raise VMError(f"{d} is a qcow2 v3 image; qemu {qb.version} can only open qcow2 v2",
                          hint=f"convert it: qemu-img amend -f qcow2 -o compat=0.10 {d}")
        info = image.image_info(d, qi)
        if qv is not None and info.format != "qcow2":
            raise VMError(f"{d} is qcow2 but {qi} says {info.format}",
                          hint="refusing to attach a qcow2 file as a raw disk")
        return d, info.format, info.virtual_size, qi
    d = run_dir / "disk.qcow2"
    qi = image.find_qemu_img(None, near=qb.path)
    # qcow2 v3 (the default since qemu-img 1.1... made default in 2.x) cannot be opened by old
    # qemu: ask a newer qemu-img for the old layout when the emulator predates 1.1
    old = qb.version_tuple < (1, 1, 0) and image.qemu_img_version(qi) >= (1, 1)
    try:
        res = image.create_image(d, "1G", "qcow2", qemu_img=qi, force=True,
                                 options=["compat=0.10"] if old else None)
    except ImageError as e:
        raise VMError(f"cannot create the run's disk image: {e.message}", hint=e.hint) from None
    return res.path, res.format, res.virtual_size, res.qemu_img


def _disk_args(settings: Settings, qb: QemuBinary, run: _RunDir, disk: str | Path | None,
               result: BootResult, index: int) -> list[str]:
    d, fmt, size, qi = _prepare_disk(settings, qb, run.dir, disk)
    result.disk, result.disk_format, result.disk_size = d, fmt, size
    result.disk_qemu_img = str(qi)
    return ["-drive", f"file={d},if=ide,index={index},media=disk,format={fmt}"]


def _linux_args(settings: Settings, qb: QemuBinary, run: _RunDir, kernel: str | Path | None,
                init_script: str | None, kernel_format: str) -> list[str]:
    g = guest_mod.make_linux(settings, kernel, init_script)
    if kernel_format not in KERNEL_FORMATS:
        raise VMError(f"unknown kernel format {kernel_format!r}")
    pvh_ok = qb.version_tuple >= (4, 0, 0) and g.vmlinux is not None
    if kernel_format == "vmlinux" and not pvh_ok:
        raise VMError("cannot boot an uncompressed vmlinux here",
                      hint="needs qemu >= 4.0 (PVH) and a kernel with CONFIG_PVH "
                           "compressed with xz or gzip")
    use_vmlinux = pvh_ok and kernel_format != "bzimage"
    return ["-kernel", str(g.vmlinux if use_vmlinux else g.kernel), "-initrd", str(g.initrd),
            "-append", f"{g.cmdline} kvmlab.nonce={run.nonce}"]


def _cdrom_args(iso: Path) -> list[str]:
    return ["-drive", f"file={iso},if=ide,index=2,media=cdrom,format=raw", "-boot", "d"]


def _patched(src: Path | None, dst: Path, nonce: str) -> Path:
    """A per-run copy of a cached guest file with this run's nonce in it."""
    assert src is not None
    patch_nonce(src, dst, nonce)
    return dst


def _guest_args(settings: Settings, qb: QemuBinary, kind: str, run: _RunDir, result: BootResult,
                *, disk: str | Path | None, kernel: str | Path | None, init_script: str | None,
                kernel_format: str, iso: str | Path | None) -> tuple[list[str], ElTorito | None]:
    """qemu arguments for the guest (and a user ISO's El Torito entry, to recognise its loader)."""
    if kind == "tiny":
        boot_disk = _patched(guest_mod.make_tiny(settings).disk, run.dir / "tiny.raw", run.nonce)
        args = ["-drive", f"file={boot_disk},if=ide,index=0,media=disk,format=raw", "-boot", "c"]
        if disk:
            args += _disk_args(settings, qb, run, disk, result, index=1)
        return args, None
    args = _disk_args(settings, qb, run, disk, result, index=0)
    if kind == "linux":
        return args + _linux_args(settings, qb, run, kernel, init_script, kernel_format), None
    if kind == "iso":
        g = guest_mod.make_iso(settings, kernel, init_script)
        return args + _cdrom_args(_patched(g.iso, run.dir / "guest.iso", run.nonce)), None
    user_iso = Path(iso or "").expanduser().resolve()
    if not iso or not user_iso.is_file():
        raise VMError(f"ISO not found: {user_iso}")
    return args + _cdrom_args(user_iso), read_el_torito(user_iso)


# --------------------------------------------------------------------------------------------
# boot_test
# --------------------------------------------------------------------------------------------

def boot_test(settings: Settings, *, qemu: str | Path | None = None, accel: str = "auto",
              guest: str = "tiny", iso: str | Path | None = None,
              kernel: str | Path | None = None, disk: str | Path | None = None,
              timeout: float | None = None, memory: int = DEFAULT_MEMORY,
              init_script: str | None = None, dry_run: bool = False,
              kernel_format: str = "auto",
              qemu_extra: list[str] | None = None) -> BootResult:
    """Boot one test guest and return what happened (see the module docstring).

    kernel_format (linux guest): "auto" boots the uncompressed PVH vmlinux on qemu >= 4.0 when
    the kernel has one (skips the in-guest decompression: several seconds under TCG), else the
    bzImage; "bzimage" / "vmlinux" force one.

    Raises VMError for problems before or around the boot (no/invalid qemu, --accel kvm not
    really in use, KVM internal error); a guest that does not reach its marker in time returns
    ``booted=False`` with ``failure`` set and the serial log kept.
    """
    with sigterm_as_interrupt():
        return _boot_test(settings, qemu=qemu, accel=accel, guest=guest, iso=iso, kernel=kernel,
                          disk=disk, timeout=timeout, memory=memory, init_script=init_script,
                          dry_run=dry_run, kernel_format=kernel_format, qemu_extra=qemu_extra)


def _kind_and_timeout(guest: str, iso: str | Path | None,
                      timeout: float | None) -> tuple[str, float]:
    kind = "user-iso" if iso else guest
    if kind not in (*GUESTS, "user-iso"):
        raise VMError(f"unknown guest {guest!r}", hint="use one of " + ", ".join(GUESTS))
    if timeout is None:
        timeout = DEFAULT_TIMEOUT[kind]
    if timeout <= 0:
        raise VMError("--timeout must be positive")
    return kind, timeout


def _boot_test(settings: Settings, *, qemu: str | Path | None, accel: str, guest: str,
               iso: str | Path | None, kernel: str | Path | None, disk: str | Path | None,
               timeout: float | None, memory: int, init_script: str | None, dry_run: bool,
               kernel_format: str, qemu_extra: list[str] | None) -> BootResult:
    t_call = time.monotonic()
    kind, timeout = _kind_and_timeout(guest, iso, timeout)
    qb = find_qemu(settings, qemu)
    want, reason = choose_accel(accel)
    run = _new_run(settings, kind)
    cmd = launch.vm_args(qb, name=run.name, serial=run.serial, pidfile=run.pidfile,
                         sock=run.monitor, accel=want, memory=memory)
    result = BootResult(False, "", None, run.serial, qemu_version=qb.version, guest=kind,
                        qemu=str(qb.path), accel_reason=reason, run_dir=run.dir, name=run.name,
                        pidfile=run.pidfile, marker=marker_for(run.nonce))
    try:
        args, eltorito = _guest_args(settings, qb, kind, run, result, disk=disk, kernel=kernel,
                                     init_script=init_script, kernel_format=kernel_format, iso=iso)
        cmd += args + list(qemu_extra or [])
        result.command = cmd
        (run.dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        if not dry_run:
            watch.run(qb, cmd, result, monitor=run.monitor, errlog=run.errlog, want=want,
                      accel=accel, timeout=timeout, eltorito=eltorito)
    finally:
        shutil.rmtree(run.sockdir, ignore_errors=True)
        result.wall_seconds = time.monotonic() - t_call
        if not dry_run:
            try:
                (run.dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
            except OSError:
                pass
        _prune_runs(run.dir.parent)  # after the boot: deleting old disks/ISOs is not the VM's time
    return result

