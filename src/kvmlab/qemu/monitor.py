"""THE one monitor client: QMP or the human monitor (HMP) of a qemu on a unix socket.

``Monitor(path, qmp)`` connects (retrying while qemu starts), then ``execute`` (QMP), ``hmp``
(a human-monitor command on either protocol: QMP wraps it in ``human-monitor-command``),
``kvm_enabled``, ``cont`` and ``quit``. Which protocol a binary speaks and how its socket is
declared comes from kvmlab.qemu.binary (``QemuBinary.uses_qmp`` / ``monitor_args``); the
module-level ``quit(sock, timeout)`` is the install step's "did it get past firmware loading?".
"""
from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmlab.core.errors import VMError

_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]|\x1b[=>]")
PROMPT = b"(qemu) "
RETRY = 0.002


class Monitor:
    """QMP or human monitor on a unix socket."""

    def __init__(self, path: Path, qmp: bool):
        self.path, self.qmp = path, qmp
        self.sock: socket.socket | None = None
        self.buf = b""
        self.banner = ""  # HMP: the text before the first prompt; QMP: "QEMU x.y.z (QMP)"

    def connect(self, deadline: float, alive: Callable[[], bool] | None = None) -> None:
        """Connect by ``deadline`` (time.monotonic()), retrying while ``alive()``; with no
        ``alive`` a single attempt (its OSError propagates). Then read the greeting."""
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
                break
            except OSError:
                s.close()
                if alive is None:
                    raise
                if not alive():
                    raise VMError("qemu exited before its monitor answered") from None
                if time.monotonic() > deadline:
                    raise VMError("qemu's monitor did not answer in time") from None
                time.sleep(RETRY)
        self.sock.settimeout(max(1.0, deadline - time.monotonic()))
        self._greeting()

    def _greeting(self) -> None:
        if self.qmp:
            greet = self._read_json().get("QMP", {}).get("version", {}).get("qemu", {})
            self.banner = "QEMU {}.{}.{} (QMP)".format(greet.get("major", "?"),
                                                       greet.get("minor", "?"),
                                                       greet.get("micro", "?"))
            self.execute("qmp_capabilities")
        else:
            self.banner = self._read_prompt()

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

    def _read_json(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            self._recv()
        line, self.buf = self.buf.split(b"\n", 1)
        data = json.loads(line)
        return data if isinstance(data, dict) else {}

    def _read_prompt(self) -> str:
        while PROMPT not in self.buf:
            self._recv()
        out, self.buf = self.buf.split(PROMPT, 1)
        return _ANSI.sub(b"", out).decode("latin-1")

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
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

    def quit(self) -> None:
        """Ask qemu to exit; wait (up to the socket timeout) until it closes the connection."""
        assert self.sock
        self.sock.sendall(json.dumps({"execute": "quit"}).encode() + b"\n" if self.qmp
                          else b"quit\n")
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass


def quit(sock: Path, timeout: float, qmp: bool = False) -> str:
    """Connect once to the monitor at ``sock``, read its greeting and send ``quit``.

    Returns the first line of the greeting (e.g. "QEMU 0.12.1 monitor - type 'help' for more
    information"); "" when no monitor answered within ``timeout`` (at most 10 s): not listening
    yet, closed, or no prompt.
    """
    limit = min(timeout, 10)
    mon = Monitor(sock, qmp)
    try:
        mon.connect(time.monotonic() + limit)
        mon.quit()
    except (OSError, ValueError, VMError):
        return ""
    finally:
        mon.close()
    first = (mon.banner.strip().splitlines() or [""])[0].strip()
    return first or ("(qmp)" if qmp else "(qemu)")  # it answered, with an empty banner
