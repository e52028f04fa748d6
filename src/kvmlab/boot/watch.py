"""Watch one launched test VM: is KVM really in use, the boot marker, power-off, the facts.

``run`` starts qemu through kvmlab.qemu.launch (paused), asks the monitor which accelerator is
really in use before the guest runs, resumes it and polls the serial log for this run's marker
(a user ISO: its boot loader's evidence, kvmlab.boot.iso) and qemu's stderr for "KVM internal
error"; qemu is killed on timeout, error, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from kvmlab.boot.iso import ElTorito, loader_evidence
from kvmlab.boot.kvmstat import ExitCounter
from kvmlab.boot.marker import parse_facts
from kvmlab.boot.result import BootResult
from kvmlab.core.errors import VMError
from kvmlab.qemu import launch
from kvmlab.qemu.binary import QemuBinary

CONNECT_TIMEOUT = 30.0
POWEROFF_GRACE = 10.0
POLL = 0.005
ISO_CHECK_EVERY = 0.2
KVM_ERROR_RE = re.compile(r"KVM internal error|kvm run failed|KVM: entry failed", re.IGNORECASE)


def run(qb: QemuBinary, cmd: list[str], result: BootResult, *, monitor: Path, errlog: Path,
        want: str, accel: str, timeout: float, eltorito: ElTorito | None) -> None:
    """Boot ``cmd`` (a paused qemu with its monitor on ``monitor``) and fill in ``result``."""
    result.serial_log.touch()
    exits = ExitCounter()
    exits.start()
    t0 = time.monotonic()
    deadline = t0 + timeout
    with launch.running(cmd, sock=monitor, qmp=qb.uses_qmp, stderr=errlog,
                        stdout=errlog.parent / "qemu.stdout") as q:
        try:
            q.monitor.connect(min(deadline, t0 + CONNECT_TIMEOUT), q.alive)
            kvm = q.monitor.kvm_enabled()
        except (VMError, OSError, ValueError) as e:
            q.kill()
            result.warnings = launch.stderr_lines(errlog)
            raise q.did_not_start(e) from None
        _check_accel(q, result, kvm, want=want, accel=accel)
        q.monitor.cont()
        _watch(q, result, eltorito, t0=t0, deadline=deadline, timeout=timeout, exits=exits)
        exits.sample(force=True)
        _after(q, result, eltorito, deadline)
    result.kvm_exits = exits.delta
    _check_exits(result, accel)


def _check_exits(result: BootResult, accel: str) -> None:
    """--accel kvm: the monitor said KVM, so KVM's own exit counter (when readable) must have
    moved; a boot without a single KVM exit did not run under KVM."""
    if accel == "kvm" and result.accel == "kvm" and result.booted and result.kvm_exits == 0:
        raise VMError("--accel kvm: the monitor says KVM is enabled but KVM counted no VM exits "
                      "during the boot (/sys/kernel/debug/kvm/exits did not move)",
                      hint="the guest did not run under this kernel's KVM; `invoke doctor` "
                           "explains; use --accel auto or tcg")


def _check_accel(q: launch.Running, result: BootResult, kvm: bool, *, want: str,
                 accel: str) -> None:
    """What the monitor says, not what the command line asked for (qemu-kvm 0.12 falls back to
    emulation silently): --accel kvm fails, auto says so."""
    result.accel = "kvm" if kvm else "tcg"
    if want != "kvm" or kvm:
        return
    if accel == "kvm":
        q.kill()
        result.warnings = launch.stderr_lines(q.stderr)
        why = " | ".join(w for w in result.warnings if "kvm" in w.lower())[:300]
        raise VMError("--accel kvm: qemu is not using KVM (the monitor's `info kvm` says "
                      "disabled)" + (f"; qemu said: {why}" if why else ""),
                      hint="qemu could not initialise KVM and went on emulating (see its "
                           "messages); `invoke doctor` explains; use --accel auto or tcg")
    result.accel_reason += "; qemu fell back to TCG"


def _booted(result: BootResult, t0: float, evidence: str = "") -> None:
    result.seconds = time.monotonic() - t0
    result.booted = True
    result.evidence = evidence


def _watch(q: launch.Running, result: BootResult, eltorito: ElTorito | None, *, t0: float,
           deadline: float, timeout: float, exits: ExitCounter) -> None:
    """Poll the serial log until the marker (a user ISO: its loader's evidence), qemu's exit,
    a KVM internal error (VMError) or the deadline (qemu killed)."""
    marker = result.marker.encode()
    iso_checks = 0
    err_size = -1
    buf = b""
    with open(result.serial_log, "rb") as sf:
        while True:
            chunk = sf.read()
            buf += chunk
            exits.sample(force=bool(chunk and marker in buf))
            if chunk and marker in buf:
                return _booted(result, t0)
            if eltorito is not None and time.monotonic() - t0 > ISO_CHECK_EVERY * (iso_checks + 1):
                iso_checks += 1
                if _iso_booted(q, result, buf, eltorito, t0):
                    return None
            rc = q.proc.poll()
            if rc is not None:
                buf += sf.read()
                if marker in buf:
                    return _booted(result, t0)
                result.failure = f"qemu exited (status {rc}) before the marker appeared"
                return None
            err_size = _check_kvm_error(q, result, err_size)
            if time.monotonic() > deadline:
                result.failure = (f"timeout: no marker on the serial console within "
                                  f"{timeout:g} s; qemu was killed")
                q.kill()
                return None
            time.sleep(POLL)


def _iso_booted(q: launch.Running, result: BootResult, serial: bytes, et: ElTorito,
                t0: float) -> bool:
    ev = loader_evidence(q.monitor, serial, et)
    if not ev:
        return False
    _booted(result, t0, ev)
    try:
        q.monitor.hmp(f"screendump {result.serial_log.parent / 'screen.ppm'}")
    except (VMError, OSError):
        pass
    return True


def _check_kvm_error(q: launch.Running, result: BootResult, last_size: int) -> int:
    """VMError when qemu's stderr (re-read when it grew) reports a KVM internal error."""
    size = q.stderr.stat().st_size
    if size != last_size and KVM_ERROR_RE.search(q.stderr.read_text(errors="replace")):
        q.kill()
        result.warnings = launch.stderr_lines(q.stderr)
        raise VMError("qemu stopped the guest with a KVM internal error: KVM is not "
                      "really usable here",
                      hint="see `invoke doctor`; use --accel auto or --accel tcg")
    return size


def _after(q: launch.Running, result: BootResult, eltorito: ElTorito | None,
           deadline: float) -> None:
    """The guest powers itself off after the marker: give it a moment, then kill; read facts."""
    note = ""
    if result.booted and eltorito is None:
        if q.wait(max(0.5, min(POWEROFF_GRACE, deadline - time.monotonic()))):
            result.powered_off = True
        else:
            note = "guest did not power off after the marker; qemu was killed"
    q.kill()
    try:
        text = result.serial_log.read_bytes().decode("utf-8", "replace")
    except OSError:
        text = ""
    result.facts = parse_facts(text)
    result.warnings = launch.stderr_lines(q.stderr) + ([note] if note else [])
    cs = result.facts.get("clocksource")
    if result.booted and cs and result.accel == "kvm" and cs != "kvm-clock":
        result.warnings.append(f"KVM in use but the guest's clocksource is {cs}, not kvm-clock")
