"""What a qemu binary is and can do: THE one qemu probe (``-version`` and ``-help``).

``probe_qemu(path)`` runs ``-version`` and ``-help`` (both at once: qemu's start-up is the slow
part) and returns a ``QemuBinary`` whose properties answer the version-dependent questions
(accelerator flags, display flags, QMP or the human monitor, socket option spelling). The answer
is cached per process and, with ``cache_dir``, on disk as a ``kvmlab.core.stamps.Stamp`` keyed by
the binary's path, size and mtime. ``version_line`` and ``l_help`` are the two cheaper questions
the install step asks. ``distro_binary`` finds the distribution's own binaries through dpkg.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core import proc
from kvmlab.core.errors import KvmlabError, VMError
from kvmlab.core.stamps import Stamp

# "QEMU emulator version 7.2.22 (Debian ...)", "QEMU PC emulator version 0.12.1 (qemu-kvm-0.12.1.2)"
VERSION_RE = re.compile(r"QEMU (?:PC )?emulator version (\d+)\.(\d+)(?:\.(\d+))?([^\n]*)")
# the loose form: any "version X.Y" (qemu-img, other front ends)
SHORT_VERSION_RE = re.compile(r"version (\d+)\.(\d+)")
PROBE_TIMEOUT = 15
ASK_TIMEOUT = 10


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
        return socket_opts(self.version_tuple)

    def monitor_args(self, sock: Path, qmp: bool | None = None) -> list[str]:
        """``-qmp``/``-monitor unix:SOCK,<server options>`` (QMP when the binary has it)."""
        use_qmp = self.uses_qmp if qmp is None else qmp
        return ["-qmp" if use_qmp else "-monitor", f"unix:{sock},{self.socket_opts()}"]

    def accel_args(self, accel: str) -> list[str]:
        if self.has("-accel"):
            return ["-accel", accel]
        if "accel=" in self.help and self.has("-machine"):
            return ["-machine", f"accel={accel}"]
        if accel == "kvm":
            return ["-enable-kvm"] if self.has("-enable-kvm") else []  # qemu-kvm: KVM is default
        return ["-no-kvm"] if self.qemu_kvm else []                    # upstream: TCG is default


def socket_opts(version: tuple[int, ...]) -> str:
    """Server options of a unix socket character device for this qemu version.

    'server,nowait' is deprecated (warns) since 6.0; the long form is not known to 0.12.
    """
    return "server=on,wait=off" if tuple(version) >= (5, 0, 0) else "server,nowait"


def version_tuple(version_line: str) -> tuple[int, int]:
    """(major, minor) of any "... version X.Y ..." line; (0, 0) when there is none."""
    mo = SHORT_VERSION_RE.search(version_line)
    return (int(mo.group(1)), int(mo.group(2))) if mo else (0, 0)


def parse_version(text: str) -> tuple[str, tuple[int, int, int]] | None:
    """("7.2.22", (7, 2, 22)) / ("0.12.1 (qemu-kvm-0.12.1.2)", (0, 12, 1)) from ``-version``."""
    m = VERSION_RE.search(text)
    if not m:
        return None
    vt = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    version = f"{vt[0]}.{vt[1]}.{vt[2]}" if m.group(3) else f"{vt[0]}.{vt[1]}"
    extra = m.group(4).strip().strip(",").strip()
    if extra.startswith("(") and "qemu-kvm" in extra:  # "(qemu-kvm-0.12.1.2)", not "(Debian ...)"
        version += " " + extra.split(")")[0] + ")"
    return version, vt


# --------------------------------------------------------------------------------------------
# probe_qemu
# --------------------------------------------------------------------------------------------

_probe_cache: dict[tuple[str, int, int], QemuBinary] = {}


def resolve(path: str | Path) -> Path:
    """The executable ``path`` names (a path, or a command on PATH); VMError when there is none."""
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
    return p


def _stamp(cache_dir: Path, key: tuple[str, int, int]) -> Stamp:
    name = hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".json"
    return Stamp(cache_dir / name, "qemu-probe")


def _key_inputs(key: tuple[str, int, int]) -> dict[str, Any]:
    return {"path": key[0], "mtime_ns": key[1], "size": key[2]}


def _from_record(p: Path, rec: Any) -> QemuBinary | None:
    try:
        vt = tuple(int(x) for x in rec["version_tuple"])
        if len(vt) != 3:
            return None
        return QemuBinary(p, str(rec["version"]), (vt[0], vt[1], vt[2]), str(rec["help"]))
    except (TypeError, KeyError, ValueError):
        return None


def _ask_all(p: Path, args: tuple[str, ...], timeout: float) -> dict[str, tuple[str, int]]:
    """Run ``p ARG`` for each ARG at the same time; {arg: (stdout + stderr, exit status)}."""
    procs: dict[str, proc.Popen] = {}
    try:
        for arg in args:
            procs[arg] = proc.spawn([p, arg], stdout=proc.PIPE, stderr=proc.PIPE)
        outs = {}
        for arg, pr in procs.items():
            try:
                o, e = pr.communicate(timeout=timeout)
            except proc.TimeoutExpired:
                raise VMError(f"{p} {arg} did not answer within {timeout:.0f} s",
                              hint="is this really qemu-system-x86_64?") from None
            outs[arg] = (o.decode(errors="replace") + e.decode(errors="replace"), pr.returncode)
        return outs
    except OSError as e:
        raise VMError(f"cannot run {p}: {e.strerror}") from None
    except proc.ToolMissing:  # the file exists: its interpreter (#!) does not
        raise VMError(f"cannot run {p}: its interpreter is missing") from None
    finally:
        for pr in procs.values():
            proc.kill_group(pr)


def _check_answers(p: Path, outs: dict[str, tuple[str, int]]) -> QemuBinary:
    vout, vrc = outs["-version"]
    parsed = parse_version(vout)
    if parsed is None:
        said = vout.strip().splitlines()
        raise VMError(f"{p} is not a qemu system emulator: `-version` printed "
                      + (repr(said[0][:100]) if said else "nothing") + f" (exit status {vrc})",
                      hint="pass --qemu with a qemu-system-x86_64 binary")
    text = outs["-help"][0]
    if "-serial" not in text:
        raise VMError(f"{p} -help does not list -serial: not a system emulator",
                      hint="pass a qemu-system-x86_64 binary")
    return QemuBinary(p, parsed[0], parsed[1], text)


def probe_qemu(path: str | Path, timeout: float = PROBE_TIMEOUT,
               cache_dir: Path | None = None) -> QemuBinary:
    """Run ``-version`` and ``-help``; a clear VMError when this is not a qemu system emulator.

    With ``cache_dir`` the answer is kept on disk, keyed by the binary's path, size and mtime
    (spawning qemu twice costs ~80 ms of the tiny guest's ~150 ms boot).
    """
    p = resolve(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key in _probe_cache:
        return _probe_cache[key]
    stamp = _stamp(cache_dir, key) if cache_dir is not None else None
    qb = _from_record(p, stamp.fresh(_key_inputs(key))) if stamp is not None else None
    if qb is None:
        qb = _check_answers(p, _ask_all(p, ("-version", "-help"), timeout))
        if stamp is not None:
            try:
                stamp.write(_key_inputs(key), {"version": qb.version,
                                               "version_tuple": list(qb.version_tuple),
                                               "help": qb.help})
            except OSError:
                pass  # a cache only
    _probe_cache[key] = qb
    return qb


# --------------------------------------------------------------------------------------------
# The cheaper questions (install asks them of binaries that may not even run here)
# --------------------------------------------------------------------------------------------

def version_line(qemu: str | Path, timeout: float = ASK_TIMEOUT,
                 error: type[KvmlabError] = VMError) -> str:
    """The first line of ``qemu -version``; ``error`` (VMError unless the caller's room wants its
    own class) when it does not run, does not answer in time, or fails."""
    try:
        r = proc.run([qemu, "-version"], timeout=timeout, cwd="/", what=f"{qemu} -version")
    except proc.CommandTimeout:
        raise error(f"{qemu} -version did not answer within {timeout:.0f} s") from None
    except OSError as e:
        raise error(f"cannot run {qemu}: {e.strerror}",
                    hint="is it an executable for this machine?") from None
    except KvmlabError as e:  # not installed, permission denied
        raise error(e.message, hint=e.hint or "is it an executable for this machine?") from None
    if r.returncode != 0:
        raise error(f"{qemu} -version failed (exit {r.returncode}): "
                    f"{(r.stderr or r.stdout).strip()[:300]}",
                    hint="missing shared libraries? try `ldd " + str(qemu) + "`")
    return (r.stdout.strip().splitlines() or [""])[0]


def l_help(qemu: str | Path, timeout: float = ASK_TIMEOUT) -> list[Path] | None:
    """``qemu -L help`` (QEMU >= 5.x): the data directories, in search order; None when this
    binary cannot say (older qemu, does not run, no answer in time)."""
    try:
        r = proc.run([qemu, "-L", "help"], timeout=timeout, cwd="/")
    except (OSError, KvmlabError):
        return None
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode != 0 or not lines or not all(ln.startswith("/") for ln in lines):
        return None
    return [Path(os.path.normpath(ln)) for ln in lines]


# --------------------------------------------------------------------------------------------
# Which qemu: the distribution's, or the default one
# --------------------------------------------------------------------------------------------

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
            r = proc.run([dpkg_query, "-L", pkg], timeout=DPKG_TIMEOUT)
        except (OSError, KvmlabError):
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


def path_or_distro(name: str) -> Path | None:
    """``name`` on PATH, else the distribution's package's file (when PATH has none)."""
    found = shutil.which(name)
    return Path(found) if found else distro_binary(name)


def default_qemu(installed: str | Path | None = None) -> Path:
    """``installed`` (the build kvmlab installed, when the caller knows one) > qemu on PATH >
    the distribution's package (when PATH has none)."""
    if installed and Path(installed).exists():
        return Path(installed)
    found = path_or_distro("qemu-system-x86_64")
    if found:
        return found
    raise VMError("no qemu-system-x86_64: none installed by kvmlab, none on PATH, no "
                  "qemu-system-x86 package",
                  hint="run `invoke install`, apt-get install qemu-system-x86, or pass --qemu")
