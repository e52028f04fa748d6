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

Accelerator: ``auto`` runs kvmlab.host.doctor.probe_kvm() and asks for KVM only when it says KVM really
runs an unmodified guest, else TCG, and says which and why (``BootResult.accel_reason``);
``kvm`` fails (VMError) when the probe says KVM is not usable, when the monitor says KVM is not
in use after all (qemu-kvm 0.12's silent fallback), or when qemu reports a KVM internal error;
``tcg`` asks for emulation (``-accel tcg``, ``-machine accel=tcg``, or ``-no-kvm`` on qemu-kvm).

``--iso PATH`` (a user's installer ISO) passes when the boot loader was loaded from the CD and
started. What is checked, in order: (a) the serial log shows a boot loader's banner (ISOLINUX,
SYSLINUX, GRUB); or (b) the El Torito boot image named by the ISO's boot catalog is in guest
memory at its load address (read through the monitor: ``xp /512xb 0x7c00``): the first 16
bytes identical and at least 90% of the first 512 (loaders keep a few variables in their first
sector). SeaBIOS jumps to the image as soon as it has loaded it, so (b) means the loader started.
A VGA screendump (``screen.ppm``) is saved next to the serial log for a human to look at.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.boot import guest as guest_mod
from kvmlab.core.errors import ImageError, KvmlabError, VMError
from kvmlab.core.fsutil import atomic_write_json
from kvmlab.core.proc import kill_group, sigterm_as_interrupt
from kvmlab.core.settings import Settings

ACCELS = ("auto", "kvm", "tcg")
GUESTS = ("tiny", "linux", "iso")
DEFAULT_TIMEOUT = {"tiny": 30.0, "linux": 180.0, "iso": 240.0, "user-iso": 120.0}
DEFAULT_MEMORY = 256
POWEROFF_GRACE = 10.0
POLL = 0.005
KEEP_RUNS = 20
LOADER_BANNERS = ("ISOLINUX", "SYSLINUX", "GNU GRUB", "GRUB loading", "Welcome to GRUB")
KVM_ERROR_RE = re.compile(r"KVM internal error|kvm run failed|KVM: entry failed", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# What a qemu binary supports
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QemuBinary:
    path: Path
    version: str                 # e.g. "7.2.22" or "0.12.1 (qemu-kvm-0.12.1.2)"
    version_tuple: tuple[int, int, int]
    help: str

    def has(self, option: str) -> bool:
        return re.search(rf"^{re.escape(option)}(\s|\[|$)", self.help, re.MULTILINE) is not None

    @property
    def qemu_kvm(self) -> bool:
        """The qemu-kvm fork: tries KVM by default, -no-kvm turns it off.

        (0.12.1.2's -help glues it to the previous line: "read/write config file-no-kvm ...".)
        """
        return "qemu-kvm" in self.version or re.search(r"-no-kvm\s", self.help) is not None

    @property
    def display_args(self) -> list[str]:
        return ["-display", "none"] if "-display none" in self.help else ["-nographic"]

    @property
    def uses_qmp(self) -> bool:
        return self.version_tuple >= (1, 0, 0) and self.has("-qmp")

    def socket_opts(self) -> str:
        # 'server,nowait' is deprecated (warns) since 6.0; the long form is not known to 0.12
        return "server=on,wait=off" if self.version_tuple >= (5, 0, 0) else "server,nowait"

    def accel_args(self, accel: str) -> list[str]:
        if self.has("-accel"):
            return ["-accel", accel]
        if "accel=" in self.help and self.has("-machine"):
            return ["-machine", f"accel={accel}"]
        if accel == "kvm":
            return ["-enable-kvm"] if self.has("-enable-kvm") else []  # qemu-kvm: KVM is default
        return ["-no-kvm"] if self.qemu_kvm else []                    # upstream: TCG is default


_VERSION_RE = re.compile(r"QEMU (?:PC )?emulator version (\d+)\.(\d+)(?:\.(\d+))?([^\n]*)")
_probe_cache: dict[tuple, QemuBinary] = {}


def probe_qemu(path: str | Path, timeout: float = 15, cache_dir: Path | None = None) -> QemuBinary:
    """Run ``-version`` and ``-help``; a clear VMError when this is not a qemu system emulator.

    With ``cache_dir`` the answer is kept on disk, keyed by the binary's path, size and mtime
    (spawning qemu twice costs ~80 ms of the tiny guest's ~150 ms boot).
    """
    p = Path(path)
    if not p.exists():
        found = shutil.which(str(path)) if "/" not in str(path) else None
        if not found:
            raise VMError(f"qemu binary not found: {path}",
                          hint="pass --qemu PATH, run `invoke install`, or apt-get install "
                               "qemu-system-x86")
        p = Path(found)
    if p.is_dir() or not os.access(p, os.X_OK):
        raise VMError(f"{p} is not an executable file", hint="pass the qemu-system-x86_64 binary")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key in _probe_cache:
        return _probe_cache[key]
    cache_file = None
    if cache_dir is not None:
        import hashlib
        cache_file = cache_dir / (hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".json")
        try:
            d = json.loads(cache_file.read_text())
            qb = QemuBinary(p, d["version"], tuple(d["version_tuple"]), d["help"])  # type: ignore[arg-type]
            _probe_cache[key] = qb
            return qb
        except (OSError, ValueError, KeyError):
            pass

    procs = {}
    try:
        for arg in ("-version", "-help"):  # both at once: qemu's start-up is the slow part
            procs[arg] = subprocess.Popen([str(p), arg], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        outs = {}
        for arg, pr in procs.items():
            try:
                o, e = pr.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise VMError(f"{p} {arg} did not answer within {timeout:.0f} s",
                              hint="is this really qemu-system-x86_64?") from None
            outs[arg] = (o.decode(errors="replace") + e.decode(errors="replace"), pr.returncode)
    except OSError as e:
        raise VMError(f"cannot run {p}: {e.strerror}") from None
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                kill_group(pr)

    vout, vrc = outs["-version"]
    m = _VERSION_RE.search(vout)
    if not m:
        said = vout.strip().splitlines()
        raise VMError(f"{p} is not a qemu system emulator: `-version` printed "
                      + (repr(said[0][:100]) if said else "nothing") + f" (exit status {vrc})",
                      hint="pass --qemu with a qemu-system-x86_64 binary")
    vt = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    version = f"{vt[0]}.{vt[1]}.{vt[2]}" if m.group(3) else f"{vt[0]}.{vt[1]}"
    extra = m.group(4).strip().strip(",").strip()
    if extra.startswith("(") and "qemu-kvm" in extra:  # "(qemu-kvm-0.12.1.2)", not "(Debian ...)"
        version += " " + extra.split(")")[0] + ")"
    text = outs["-help"][0]
    if "-serial" not in text:
        raise VMError(f"{p} -help does not list -serial: not a system emulator",
                      hint="pass a qemu-system-x86_64 binary")
    qb = QemuBinary(p, version, vt, text)
    _probe_cache[key] = qb
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": version, "version_tuple": vt, "help": text}))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return qb


# The distribution's own binaries: the files its packages installed (dpkg says which), never
# PATH's first hit, which is whatever was installed last into /usr/local/bin (e.g. a qemu-kvm 0.12
# build by kvmlab itself).
DISTRO_PACKAGES: dict[str, tuple[str, ...]] = {
    "qemu-system-x86_64": ("qemu-system-x86",),   # Debian >= 9 (before: qemu-kvm, qemu-system)
    "qemu-img": ("qemu-utils",),
}
DPKG_TIMEOUT = 20


def distro_binary(name: str, packages: tuple[str, ...] | None = None) -> Path | None:
    """``name`` as installed by the distribution's package (``dpkg-query -L PACKAGE``).

    None when the package is not installed, has no such file (removed, config files only) or
    there is no dpkg on this host.
    """
    dpkg_query = "/usr/bin/dpkg-query" if os.path.exists("/usr/bin/dpkg-query") else "dpkg-query"
    for pkg in packages if packages is not None else DISTRO_PACKAGES.get(name, ()):
        try:
            r = subprocess.run([dpkg_query, "-L", pkg], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=DPKG_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if r.returncode != 0:
            continue
        for line in r.stdout.splitlines():
            p = Path(line.strip())
            if p.name == name and p.parent.name in ("bin", "sbin") and p.is_file() \
                    and os.access(p, os.X_OK):
                return p
    return None


def distro_qemu() -> Path | None:
    """Debian's qemu-system-x86_64 (package qemu-system-x86), or None when not installed."""
    return distro_binary("qemu-system-x86_64")


def distro_qemu_img() -> Path | None:
    """Debian's qemu-img (package qemu-utils), or None when not installed."""
    return distro_binary("qemu-img")


def default_qemu(settings: Settings | None) -> Path:
    """--qemu flag > the installed build (kvmlab.install.txn.installed_qemu) > qemu on PATH >
    the distribution's package (when PATH has none)."""
    if settings is not None:
        try:
            from kvmlab.install.txn import (
                installed_qemu,  # owned by helper "install"; optional here
            )
            q = installed_qemu(settings)
            if q and Path(q).exists():
                return Path(q)
        except (ImportError, KvmlabError, OSError, ValueError):
            pass  # nothing installed (or no install manifest readable): fall back to PATH
    found = shutil.which("qemu-system-x86_64")
    if found:
        return Path(found)
    distro = distro_qemu()
    if distro:
        return distro
    raise VMError("no qemu-system-x86_64: none installed by kvmlab, none on PATH, no qemu-system-x86 "
                  "package", hint="run `invoke install`, apt-get install qemu-system-x86, or pass --qemu")


# --------------------------------------------------------------------------------------------
# Monitor clients
# --------------------------------------------------------------------------------------------

_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]|\x1b[=>]")


class Monitor:
    """QMP or human monitor on a unix socket; only what boot-test needs."""

    def __init__(self, path: Path, qmp: bool):
        self.path, self.qmp = path, qmp
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self, deadline: float, alive: Any) -> None:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
                break
            except OSError:
                s.close()
                if not alive():
                    raise VMError("qemu exited before its monitor answered") from None
                if time.monotonic() > deadline:
                    raise VMError("qemu's monitor did not answer in time") from None
                time.sleep(0.002)
        self.sock.settimeout(max(1.0, deadline - time.monotonic()))
        if self.qmp:
            self._read_json()  # greeting
            self.execute("qmp_capabilities")
        else:
            self._read_prompt()

    def close(self) -> None:
        if self.sock:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _recv(self) -> None:
        assert self.sock
        data = self.sock.recv(65536)
        if not data:
            raise VMError("qemu closed its monitor connection")
        self.buf += data

    def _read_json(self) -> dict:
        while b"\n" not in self.buf:
            self._recv()
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _read_prompt(self) -> str:
        while b"(qemu) " not in self.buf:
            self._recv()
        out, self.buf = self.buf.split(b"(qemu) ", 1)
        return _ANSI.sub(b"", out).decode("latin-1")

    def execute(self, cmd: str, args: dict | None = None) -> Any:
        assert self.sock and self.qmp
        msg = {"execute": cmd, **({"arguments": args} if args else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read_json()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise VMError(f"QMP {cmd}: {r['error'].get('desc', r['error'])}")
            # an event: skip

    def hmp(self, line: str) -> str:
        """A human-monitor command; its output text."""
        if self.qmp:
            return str(self.execute("human-monitor-command", {"command-line": line}))
        assert self.sock
        self.sock.sendall(line.encode() + b"\n")
        out = self._read_prompt().replace("\r", "")
        lines = out.split("\n")
        if lines and line in lines[0]:  # the echoed command
            lines = lines[1:]
        return "\n".join(lines)

    def kvm_enabled(self) -> bool:
        if self.qmp:
            return bool(self.execute("query-kvm").get("enabled"))
        out = self.hmp("info kvm")
        m = re.search(r"kvm support:\s*(\w+)", out)
        if not m:
            raise VMError("the monitor's `info kvm` gave no answer: " + out.strip()[:200])
        return m.group(1) == "enabled"

    def cont(self) -> None:
        if self.qmp:
            self.execute("cont")
        else:
            self.hmp("cont")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

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

    def to_dict(self) -> dict:
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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_kvm_probe: Any = None


def choose_accel(accel: str) -> tuple[str, str]:
    """(accel to ask for, why). auto: KVM only when the host probe says it really works."""
    if accel not in ACCELS:
        raise VMError(f"unknown accelerator {accel!r}", hint="use auto, kvm or tcg")
    if accel == "tcg":
        return "tcg", "--accel tcg"
    global _kvm_probe
    if _kvm_probe is None:  # once per process: `boot-test` boots two guests in a row
        from kvmlab.host.doctor import probe_kvm  # lazily: tcg runs need no probe
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


def _stderr_warnings(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _prune_runs(runs: Path, keep: int = KEEP_RUNS) -> None:
    try:
        dirs = sorted((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    except OSError:
        return
    for d in dirs[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def parse_facts(text: str) -> dict[str, str]:
    facts = {}
    for m in re.finditer(r"KVMLAB-FACT (\w+)=([^\r\n]*)", text):
        facts[m.group(1)] = m.group(2).strip()
    return facts


@dataclass(frozen=True)
class ElTorito:
    load_address: int
    sectors: int
    image_lba: int
    head: bytes  # the first 512 bytes of the boot image


def read_el_torito(iso: Path) -> ElTorito:
    """The default BIOS boot entry of an ISO (ECMA-119 + El Torito); VMError if there is none."""
    try:
        with open(iso, "rb") as f:
            f.seek(17 * 2048)
            brvd = f.read(2048)
            if brvd[0:1] != b"\0" or brvd[1:6] != b"CD001" or \
                    not brvd[7:39].startswith(b"EL TORITO SPECIFICATION"):
                raise VMError(f"{iso} is not a BIOS-bootable CD image (no El Torito boot record)",
                              hint="an installer ISO for BIOS machines has one (e.g. isolinux)")
            cat_lba = int.from_bytes(brvd[0x47:0x4B], "little")
            f.seek(cat_lba * 2048)
            cat = f.read(64)
            entry = cat[32:64]
            if cat[0] != 1 or entry[0] != 0x88:
                raise VMError(f"{iso}: the El Torito default entry is not bootable")
            seg = int.from_bytes(entry[2:4], "little") or 0x07C0
            count = int.from_bytes(entry[6:8], "little")
            lba = int.from_bytes(entry[8:12], "little")
            f.seek(lba * 2048)
            head = f.read(512)
    except OSError as e:
        raise VMError(f"cannot read {iso}: {e.strerror}") from None
    return ElTorito(seg << 4, count, lba, head)


def _memory_bytes(text: str) -> bytes:
    out = bytearray()
    for line in text.splitlines():
        if ":" in line:
            out += bytes(int(t, 16) for t in re.findall(r"0x([0-9a-fA-F]{2})\b", line.split(":", 1)[1]))
    return bytes(out)


def loader_in_memory(mem: bytes, head: bytes) -> bool:
    """Check (b) of the module docstring."""
    n = min(len(mem), len(head))
    if n < 64 or mem[:16] != head[:16] or not any(head[:16]):
        return False
    same = sum(1 for a, b in zip(mem[:n], head[:n]) if a == b)
    return same >= 0.9 * n


# --------------------------------------------------------------------------------------------
# boot_test
# --------------------------------------------------------------------------------------------

def _prepare_disk(settings: Settings, qb: QemuBinary, run_dir: Path,
                  disk: str | Path | None) -> tuple[Path, str, int, Path]:
    """(disk, format, virtual size, the qemu-img that read or made it)."""
    from kvmlab.boot import image
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


def _boot_test(settings: Settings, *, qemu: str | Path | None, accel: str, guest: str,
               iso: str | Path | None, kernel: str | Path | None, disk: str | Path | None,
               timeout: float | None, memory: int, init_script: str | None, dry_run: bool,
               kernel_format: str, qemu_extra: list[str] | None) -> BootResult:
    t_call = time.monotonic()
    kind = "user-iso" if iso else guest
    if kind not in (*GUESTS, "user-iso"):
        raise VMError(f"unknown guest {guest!r}", hint="use one of " + ", ".join(GUESTS))
    if timeout is None:
        timeout = DEFAULT_TIMEOUT[kind]
    if timeout <= 0:
        raise VMError("--timeout must be positive")
    qb = probe_qemu(qemu or default_qemu(settings), cache_dir=settings.cache / "qemu-probe")
    want, reason = choose_accel(accel)

    nonce = guest_mod.new_nonce()
    runs = settings.state_dir / "vm" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{kind}-{nonce[:6]}"
    run_dir = runs / run_id
    run_dir.mkdir()
    name = f"kvmlab-{nonce}"
    serial = run_dir / "serial.log"
    errlog = run_dir / "qemu.stderr"
    pidfile = run_dir / "qemu.pid"
    sockdir = Path(tempfile.mkdtemp(prefix="kvmlab-vm-"))  # short path: unix sockets <= 108 bytes
    mon_path = sockdir / "monitor.sock"

    cmd = [str(qb.path), "-name", name, "-M", "pc", "-m", str(memory), "-smp", "1",
           *qb.accel_args(want), *qb.display_args, "-net", "none",
           "-serial", f"file:{serial}", "-pidfile", str(pidfile), "-no-reboot",
           "-qmp" if qb.uses_qmp else "-monitor", f"unix:{mon_path},{qb.socket_opts()}", "-S"]
    result = BootResult(False, "", None, serial, qemu_version=qb.version, guest=kind,
                        qemu=str(qb.path), accel_reason=reason, run_dir=run_dir, name=name,
                        pidfile=pidfile, marker=guest_mod.marker_for(nonce))
    eltorito: ElTorito | None = None
    try:
        if kind == "tiny":
            g = guest_mod.make_tiny(settings)
            boot_disk = run_dir / "tiny.raw"
            guest_mod.patch_nonce(g.disk, boot_disk, nonce)
            cmd += ["-drive", f"file={boot_disk},if=ide,index=0,media=disk,format=raw", "-boot", "c"]
            if disk:
                d, fmt, size, qi = _prepare_disk(settings, qb, run_dir, disk)
                cmd += ["-drive", f"file={d},if=ide,index=1,media=disk,format={fmt}"]
                result.disk, result.disk_format, result.disk_size = d, fmt, size
                result.disk_qemu_img = str(qi)
        else:
            d, fmt, size, qi = _prepare_disk(settings, qb, run_dir, disk)
            result.disk, result.disk_format, result.disk_size = d, fmt, size
            result.disk_qemu_img = str(qi)
            cmd += ["-drive", f"file={d},if=ide,index=0,media=disk,format={fmt}"]
            if kind == "linux":
                g = guest_mod.make_linux(settings, kernel, init_script)
                if kernel_format not in ("auto", "bzimage", "vmlinux"):
                    raise VMError(f"unknown kernel format {kernel_format!r}")
                pvh_ok = qb.version_tuple >= (4, 0, 0) and g.vmlinux is not None
                if kernel_format == "vmlinux" and not pvh_ok:
                    raise VMError("cannot boot an uncompressed vmlinux here",
                                  hint="needs qemu >= 4.0 (PVH) and a kernel with CONFIG_PVH "
                                       "compressed with xz or gzip")
                use_vmlinux = pvh_ok and kernel_format != "bzimage"
                cmd += ["-kernel", str(g.vmlinux if use_vmlinux else g.kernel), "-initrd", str(g.initrd),
                        "-append", f"{g.cmdline} kvmlab.nonce={nonce}"]
            elif kind == "iso":
                g = guest_mod.make_iso(settings, kernel, init_script)
                run_iso = run_dir / "guest.iso"
                guest_mod.patch_nonce(g.iso, run_iso, nonce)
                cmd += ["-drive", f"file={run_iso},if=ide,index=2,media=cdrom,format=raw",
                        "-boot", "d"]
            else:
                user_iso = Path(iso).expanduser().resolve()  # type: ignore[arg-type]
                if not user_iso.is_file():
                    raise VMError(f"ISO not found: {user_iso}")
                eltorito = read_el_torito(user_iso)
                cmd += ["-drive", f"file={user_iso},if=ide,index=2,media=cdrom,format=raw",
                        "-boot", "d"]
        cmd += list(qemu_extra or [])
        result.command = cmd
        (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        if dry_run:
            shutil.rmtree(sockdir, ignore_errors=True)
            return result
        _run(qb, cmd, result, want, accel, nonce, timeout, mon_path, errlog, eltorito)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        result.wall_seconds = time.monotonic() - t_call
        if not dry_run:
            try:
                (run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
            except OSError:
                pass
        _prune_runs(runs)  # after the boot: deleting old disks/ISOs is not the VM's time
    return result


def _run(qb: QemuBinary, cmd: list[str], result: BootResult, want: str, accel: str, nonce: str,
         timeout: float, mon_path: Path, errlog: Path, eltorito: ElTorito | None) -> None:
    marker = result.marker.encode()
    serial = result.serial_log
    serial.touch()
    t0 = time.monotonic()
    deadline = t0 + timeout
    with open(errlog, "wb") as err, open(result.run_dir / "qemu.stdout", "wb") as out:  # type: ignore[operator]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        except OSError as e:
            raise VMError(f"cannot start {cmd[0]}: {e.strerror}") from None
    mon = Monitor(mon_path, qb.uses_qmp)
    try:
        try:
            mon.connect(min(deadline, t0 + 30), lambda: proc.poll() is None)
            kvm = mon.kvm_enabled()
        except (VMError, OSError, ValueError) as e:
            kill_group(proc)
            stderr = _stderr_warnings(errlog)
            result.warnings = stderr
            msg = e.message if isinstance(e, VMError) else str(e)
            raise VMError(f"qemu did not start: {msg}" +
                          (f" (exit status {proc.returncode})" if proc.returncode is not None else ""),
                          hint=("qemu said: " + " | ".join(stderr[-4:])) if stderr else
                          "run the command shown by --dry-run by hand") from None
        result.accel = "kvm" if kvm else "tcg"
        if want == "kvm" and not kvm:
            if accel == "kvm":
                kill_group(proc)
                result.warnings = _stderr_warnings(errlog)
                why = " | ".join(w for w in result.warnings if "kvm" in w.lower())[:300]
                raise VMError("--accel kvm: qemu is not using KVM (the monitor's `info kvm` says "
                              "disabled)" + (f"; qemu said: {why}" if why else ""),
                              hint="qemu could not initialise KVM and went on emulating (see its "
                                   "messages); `invoke doctor` explains; use --accel auto or tcg")
            result.accel_reason += "; qemu fell back to TCG"
        mon.cont()
        seen = 0
        err_size = -1
        buf = b""
        with open(serial, "rb") as sf:
            while True:
                chunk = sf.read()
                if chunk:
                    buf += chunk
                    if result.seconds is None and marker in buf:
                        result.seconds = time.monotonic() - t0
                        result.booted = True
                        break
                if eltorito is not None and time.monotonic() - t0 > 0.2 * (seen + 1):
                    seen += 1
                    ev = _loader_evidence(mon, buf, eltorito)
                    if ev:
                        result.seconds = time.monotonic() - t0
                        result.booted = True
                        result.evidence = ev
                        try:
                            mon.hmp(f"screendump {result.run_dir / 'screen.ppm'}")
                        except (VMError, OSError):
                            pass
                        break
                rc = proc.poll()
                if rc is not None:
                    buf += sf.read()
                    if marker in buf:
                        result.seconds = time.monotonic() - t0
                        result.booted = True
                        break
                    result.failure = f"qemu exited (status {rc}) before the marker appeared"
                    break
                esize = os.path.getsize(errlog)
                if esize != err_size and KVM_ERROR_RE.search(errlog.read_text(errors="replace")):
                    kill_group(proc)
                    result.warnings = _stderr_warnings(errlog)
                    raise VMError("qemu stopped the guest with a KVM internal error: KVM is not "
                                  "really usable here",
                                  hint="see `invoke doctor`; use --accel auto or --accel tcg")
                err_size = esize
                if time.monotonic() > deadline:
                    result.failure = (f"timeout: no marker on the serial console within "
                                      f"{timeout:g} s; qemu was killed")
                    kill_group(proc)
                    break
                time.sleep(POLL)
        note = ""
        if result.booted and eltorito is None:
            # the guest powers itself off after the marker; give it a moment, then kill
            try:
                proc.wait(timeout=max(0.5, min(POWEROFF_GRACE, deadline - time.monotonic())))
                result.powered_off = True
            except subprocess.TimeoutExpired:
                note = "guest did not power off after the marker; qemu was killed"
        mon.close()
        kill_group(proc)
        try:
            text = serial.read_bytes().decode("utf-8", "replace")
        except OSError:
            text = ""
        result.facts = parse_facts(text)
        result.warnings = _stderr_warnings(errlog) + ([note] if note else [])
        cs = result.facts.get("clocksource")
        if result.booted and cs and result.accel == "kvm" and cs != "kvm-clock":
            result.warnings.append(f"KVM in use but the guest's clocksource is {cs}, not kvm-clock")
    finally:
        mon.close()
        kill_group(proc)


def _loader_evidence(mon: Monitor, serial: bytes, et: ElTorito) -> str:
    text = serial.decode("latin-1")
    for b in LOADER_BANNERS:
        if b in text:
            return f"serial console shows the boot loader ({b!r})"
    try:
        mem = _memory_bytes(mon.hmp(f"xp /512xb 0x{et.load_address:x}"))
    except (VMError, OSError, ValueError):
        return ""
    if loader_in_memory(mem, et.head):
        return (f"El Torito boot image (LBA {et.image_lba}) loaded at 0x{et.load_address:x} "
                "and started")
    return ""


def write_last(settings: Settings, results: list[BootResult]) -> Path:
    """Record the last boot-test run for `invoke verify --step boot` (kvmlab/checks/test_boot.py)."""
    p = settings.state_dir / "vm" / "last-boot.json"
    atomic_write_json(p, [r.to_dict() for r in results])
    return p
