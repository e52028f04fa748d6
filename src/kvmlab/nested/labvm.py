"""The lab VM: the kmod recipe's kernel + the labvm initramfs under TCG with emulated SVM.

    with LabVM.boot(settings, kernel, rootfs, cpu="max", memory=2048, timeout=120) as vm:
        vm.run("modprobe kvm_amd", timeout=30)
        vm.put(Path("bundle.tar"), "/root/bundle.tar")

``boot`` starts the host distribution's qemu (the dpkg-owned binary, never PATH's first hit)
with ``-accel tcg -cpu <cpu>``, a fresh ed25519 key pair (its public half on the kernel command
line, read by /init), ssh on a hostfwd bound to 127.0.0.1 only, the serial log, qemu's command
line, a monitor socket and an ssh_config in ``STATE/nested/<run-id>/``. It waits (bounded) until
sshd answers, its host key pinned first: /init prints the key it generated on the serial console
(kvmlab's own channel to the VM), which becomes the run's known_hosts, and ssh runs with
``StrictHostKeyChecking yes`` (any other key is refused). Then it checks that the guest has
SVM: without it (e.g. ``-cpu qemu64``) there is no nested KVM, one clear error. On leaving the
block — normal end, error, timeout, Ctrl-C, SIGTERM — qemu's process group is killed, unless
``vm.keep()`` was called.
"""
from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmlab.core import proc
from kvmlab.core.errors import VMError
from kvmlab.core.fsutil import atomic_write_bytes
from kvmlab.core.settings import Settings
from kvmlab.nested.kernel import Kernel
from kvmlab.nested.rootfs import Rootfs
from kvmlab.qemu.binary import distro_qemu, version_line

DEFAULT_CPU = "max"
DEFAULT_MEMORY = 2048
DEFAULT_TIMEOUT = 180.0
SSH_TRY_TIMEOUT = 15
POLL = 1.0
SERIAL_TAIL = 15
READY = "kvmlab-labvm: ready uptime"
HOSTKEY_RE = re.compile(r"^kvmlab-labvm: hostkey (ssh-ed25519) ([A-Za-z0-9+/=]+)\s*$", re.M)
APPEND = "console=ttyS0 rdinit=/init panic=-1 quiet"


class NoSVMError(VMError):
    """The lab VM's CPU has no SVM: no KVM inside it."""


@dataclass(frozen=True)
class LabVMTimes:
    launch_to_sshd: float       # seconds from qemu's start until sshd answered
    guest_uptime: float         # the guest's /proc/uptime then


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{secrets.token_hex(3)}"


def _ssh_config(run: Path, port: int) -> str:
    return "\n".join([
        "Host *", "  HostName 127.0.0.1", f"  Port {port}", "  User root",
        f"  IdentityFile {run / 'id_ed25519'}", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {run / 'known_hosts'}", "  StrictHostKeyChecking yes",
        "  GlobalKnownHostsFile /dev/null", "  UpdateHostKeys no",
        "  BatchMode yes", "  LogLevel ERROR", "  ConnectTimeout 10",
        "  ServerAliveInterval 5", "  ServerAliveCountMax 6", ""])


def serial_tail(path: Path, n: int = SERIAL_TAIL) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-n:]


class LabVM:
    """A running lab VM (made by ``LabVM.boot``)."""

    def __init__(self, run_dir: Path, name: str, port: int, qemu: Path, cpu: str):
        self.run_dir = run_dir
        self.name = name
        self.port = port
        self.qemu = qemu
        self.cpu = cpu
        self.process: proc.Popen | None = None
        self.times = LabVMTimes(0.0, 0.0)
        self.kept = False

    # paths -----------------------------------------------------------------------------------
    @property
    def serial(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def ssh_config(self) -> Path:
        return self.run_dir / "ssh_config"

    @property
    def monitor(self) -> Path:
        return self.run_dir / "monitor.sock"

    # what a person or testinfra uses -----------------------------------------------------------
    def ssh_command(self) -> str:
        """The line a person pastes to get a shell in the lab VM."""
        return shlex.join(["ssh", "-F", str(self.ssh_config), "root@127.0.0.1"])

    def host_spec(self) -> str:
        """A testinfra host (``kvmlab verify --hosts``) for the lab VM."""
        return f"ssh://root@127.0.0.1:{self.port}?ssh_config={self.ssh_config}"

    # commands ---------------------------------------------------------------------------------
    def run(self, cmd: str, timeout: float, *, check: bool = False,
            input: str | None = None) -> proc.CompletedProcess:
        """``cmd`` (a shell line) run by root in the lab VM over ssh; check: non-zero is an
        error naming the command."""
        return proc.run(["ssh", "-F", self.ssh_config, "root@127.0.0.1", cmd], timeout=timeout,
                        check=check, input=input, what=f"in the lab VM: {cmd[:60]}")

    def put(self, local: Path, remote: str, timeout: float = 300) -> None:
        """Copy a file or directory into the lab VM (``remote``: the path it gets there)."""
        parent = os.path.dirname(remote.rstrip("/")) or "/"
        self.run(f"mkdir -p {shlex.quote(parent)}", timeout=60, check=True)
        proc.run(["scp", "-F", self.ssh_config, "-q", "-p", "-r", local,
                  f"root@127.0.0.1:{remote}"], timeout=timeout, check=True,
                 what=f"copying {local} into the lab VM")

    def dmesg(self, timeout: float = 60, save: bool = True) -> str:
        """The lab VM's kernel log (``save``: also kept as <run dir>/dmesg.txt)."""
        text = str(self.run("dmesg", timeout=timeout, check=True).stdout)
        if save:
            atomic_write_bytes(self.run_dir / "dmesg.txt", text.encode())
        return text

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def keep(self) -> None:
        """Leave the lab VM running when the block ends (the ssh command is printed)."""
        self.kept = True

    def kill(self) -> None:
        if self.process is not None:
            proc.kill_group(self.process)

    # boot ---------------------------------------------------------------------------------------
    def argv(self, kernel: Kernel, rootfs: Rootfs, memory: int, pubkey: str) -> list[str]:
        key = base64.b64encode(pubkey.strip().encode()).decode()
        return [str(self.qemu), "-name", self.name, "-accel", "tcg", "-cpu", self.cpu,
                "-m", str(memory), "-smp", "1", "-kernel", str(kernel.vmlinuz),
                "-initrd", str(rootfs.path), "-append", f"{APPEND} kvmlab.key={key}",
                "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                "-display", "none", "-serial", f"file:{self.serial}",
                "-monitor", f"unix:{self.monitor},server,nowait",
                "-pidfile", str(self.run_dir / "qemu.pid"), "-no-reboot"]

    def _start(self, argv: list[str]) -> None:
        atomic_write_bytes(self.run_dir / "qemu.cmd", (shlex.join(argv) + "\n").encode())
        with open(self.run_dir / "qemu.stderr", "wb") as err:
            self.process = proc.spawn(argv, stdout=err, stderr=err)

    def _died(self) -> VMError:
        said = [ln.strip() for ln in (self.run_dir / "qemu.stderr").read_text(
            errors="replace").splitlines() if ln.strip()]
        tail = serial_tail(self.serial, 5)
        rc = self.process.returncode if self.process else "?"
        return VMError(f"the lab VM's qemu exited (status {rc}) before its sshd answered",
                       hint=("qemu said: " + " | ".join(said[-3:]) if said else
                             "serial log: " + " | ".join(tail)) + f" (run dir {self.run_dir})")

    def _hung(self, timeout: float) -> VMError:
        tail = serial_tail(self.serial)
        for ln in tail:
            print(f"  | {ln}", file=sys.stderr)
        return VMError(f"the lab VM's sshd did not answer within {timeout:g} s; qemu was killed",
                       hint=f"last serial line: {tail[-1] if tail else '(none)'}; serial log: "
                            f"{self.serial}")

    def ready_marker(self) -> bool:
        """True once /init printed the ready marker (sshd started) on the serial port."""
        try:
            return READY in self.serial.read_text(errors="replace")
        except OSError:
            return False

    def pin_host_key(self) -> None:
        """The run's known_hosts: the host key /init printed on the serial console."""
        m = HOSTKEY_RE.search(self.serial.read_text(errors="replace").replace("\r", ""))
        if not m:
            raise VMError("the lab VM printed no ssh host key on its console; not logging in "
                          "to a VM whose key is unknown",
                          hint=f"its /init prints 'kvmlab-labvm: hostkey ...'; serial log: "
                               f"{self.serial}")
        atomic_write_bytes(self.run_dir / "known_hosts",
                           f"[127.0.0.1]:{self.port} {m[1]} {m[2]}\n".encode())

    def wait_ssh(self, timeout: float, t0: float) -> None:
        """Until sshd answers (then times are recorded); VMError at the timeout or qemu's end."""
        deadline = t0 + timeout
        pinned = False
        while True:
            if not self.alive():
                raise self._died()
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._hung(timeout)
            if self.ready_marker():
                if not pinned:
                    self.pin_host_key()
                    pinned = True
                try:
                    cp = self.run("cut -d' ' -f1 /proc/uptime", timeout=min(SSH_TRY_TIMEOUT, left))
                except proc.CommandTimeout:
                    continue
                if cp.returncode == 0 and cp.stdout.strip():
                    self.times = LabVMTimes(round(time.monotonic() - t0, 2),
                                            float(cp.stdout.split()[0]))
                    return
            time.sleep(min(POLL, max(0.05, deadline - time.monotonic())))

    def check_svm(self) -> None:
        """NoSVMError unless the guest CPU has SVM (what kvm_amd needs)."""
        cp = self.run("grep -qw svm /proc/cpuinfo", timeout=60)
        if cp.returncode == 0:
            return
        ver = version_line(self.qemu) or "?"
        raise NoSVMError(
            f"the lab VM has no SVM: {self.qemu} ({ver}) with -cpu {self.cpu} does not give "
            "its guest svm, so KVM cannot run inside it",
            hint="use -cpu max (the default): TCG emulates AMD SVM, not Intel VMX")

    @classmethod
    @contextmanager
    def boot(cls, settings: Settings, kernel: Kernel, rootfs: Rootfs, *, cpu: str = DEFAULT_CPU,
             memory: int = DEFAULT_MEMORY, timeout: float = DEFAULT_TIMEOUT,
             run_id: str | None = None) -> Iterator[LabVM]:
        """A booted lab VM with sshd answering and SVM present; killed when the block ends
        (unless kept)."""
        qemu = distro_qemu()
        if qemu is None:
            raise VMError("the distribution's qemu-system-x86_64 is not installed",
                          hint="apt-get install qemu-system-x86")
        run_id = run_id or new_run_id()
        run = settings.state_dir / "nested" / run_id
        run.mkdir(parents=True, exist_ok=False)
        vm = cls(run, f"kvmlab-labvm-{run_id}", free_port(), qemu, cpu)
        proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", vm.name, "-f",
                  run / "id_ed25519"], timeout=60, check=True)
        atomic_write_bytes(vm.ssh_config, _ssh_config(run, vm.port).encode())
        argv = vm.argv(kernel, rootfs, memory, (run / "id_ed25519.pub").read_text())
        with proc.sigterm_as_interrupt():
            try:
                t0 = time.monotonic()
                vm._start(argv)
                vm.wait_ssh(timeout, t0)
                vm.check_svm()
                yield vm
            finally:
                if vm.kept and vm.alive():
                    print(f"lab VM kept running (qemu pid {vm.process.pid if vm.process else '?'}"
                          f"): {vm.ssh_command()}", flush=True)
                else:
                    vm.kill()
