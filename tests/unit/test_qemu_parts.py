"""Unit tests of the qemu room: the probe's on-disk record, the cheap questions, the one monitor
client (HMP and QMP, quit), headless argv and the bounded launch — against fake qemus."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmlab.core.errors import InstallError, VMError
from kvmlab.qemu import binary, launch, monitor

HELP = "-serial dev     redirect the serial port\n-monitor dev    the monitor\n-qmp dev  qmp\n"


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\nimport sys, os\n{body}")
    path.chmod(0o755)
    return path


def _fake_qemu(tmp_path: Path, version: str = "QEMU emulator version 7.2.22 (Debian 1:7.2)",
               count: Path | None = None) -> Path:
    tally = f"open({str(count)!r}, 'a').write('x')\n" if count else ""
    return _script(tmp_path / "qemu-system-x86_64", tally + f'''
if "-version" in sys.argv: print({version!r})
elif "-help" in sys.argv: sys.stdout.write({HELP!r})
elif "-L" in sys.argv: print("/usr/share/qemu\\n/usr/share/seabios/")
''')


def test_probe_is_recorded_as_a_stamp_and_reused(tmp_path):
    count = tmp_path / "runs"
    q = _fake_qemu(tmp_path, count=count)
    cache = tmp_path / "probe"
    qb = binary.probe_qemu(q, cache_dir=cache)
    assert qb.version == "7.2.22" and qb.version_tuple == (7, 2, 22) and qb.uses_qmp
    assert count.read_text() == "xx"  # -version and -help
    (rec,) = cache.glob("*.json")
    data = json.loads(rec.read_text())
    assert data["step"] == "qemu-probe" and data["record"]["version"] == "7.2.22"
    binary._probe_cache.clear()  # a new process: the record on disk answers
    assert binary.probe_qemu(q, cache_dir=cache) == qb
    assert count.read_text() == "xx"


def test_probe_ignores_an_old_format_cache_file(tmp_path):
    q = _fake_qemu(tmp_path)
    cache = tmp_path / "probe"
    binary.probe_qemu(q, cache_dir=cache)
    (rec,) = cache.glob("*.json")
    rec.write_text(json.dumps({"version": "9.9", "version_tuple": [9, 9, 0], "help": HELP}))
    binary._probe_cache.clear()
    assert binary.probe_qemu(q, cache_dir=cache).version == "7.2.22"


def test_parse_version_keeps_the_qemu_kvm_fork_name():
    assert binary.parse_version("QEMU PC emulator version 0.12.1 (qemu-kvm-0.12.1.2), Copyright") \
        == ("0.12.1 (qemu-kvm-0.12.1.2)", (0, 12, 1))
    assert binary.parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg)") \
        == ("7.2.22", (7, 2, 22))
    assert binary.parse_version("not qemu") is None
    assert binary.version_tuple("QEMU PC emulator version 0.12.1 (qemu-kvm)") == (0, 12)


def test_version_line_and_l_help(tmp_path):
    q = _fake_qemu(tmp_path, version="QEMU PC emulator version 0.12.1 (qemu-kvm-0.12.1.2)")
    assert binary.version_line(q) == "QEMU PC emulator version 0.12.1 (qemu-kvm-0.12.1.2)"
    assert binary.l_help(q) == [Path("/usr/share/qemu"), Path("/usr/share/seabios")]
    bad = _script(tmp_path / "broken", 'sys.stderr.write("error while loading shared libraries")\n'
                                        'sys.exit(127)\n')
    with pytest.raises(InstallError, match="-version failed") as e:
        binary.version_line(bad, error=InstallError)
    assert "ldd" in (e.value.hint or "")
    assert binary.l_help(bad) is None
    slow = _script(tmp_path / "slow", "import time; time.sleep(30)\n")
    with pytest.raises(VMError, match="did not answer"):
        binary.version_line(slow, timeout=0.5)
    assert binary.l_help(slow, timeout=0.5) is None
    with pytest.raises(VMError, match="cannot run|not installed"):
        binary.version_line(tmp_path / "nope")


def test_headless_args_follow_the_version(tmp_path):
    sock = tmp_path / "m.sock"
    assert launch.headless_args((0, 12), sock)[-2:] == ["-monitor", f"unix:{sock},server,nowait"]
    assert launch.headless_args((7, 2), sock)[-1] == f"unix:{sock},server=on,wait=off"
    qb = binary.QemuBinary(Path("/q"), "7.2.22", (7, 2, 22), HELP)
    assert launch.headless_args(qb, sock) == launch.headless_args((7, 2, 22), sock)
    assert qb.monitor_args(sock) == ["-qmp", f"unix:{sock},server=on,wait=off"]


def _serve(path: Path, qmp: bool, got: list[bytes]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        c, _ = srv.accept()
        if qmp:
            c.sendall(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}}}\n')
        else:
            c.sendall(b"QEMU 0.12.1 monitor - type 'help' for more information\r\n(qemu) ")
        for line in c.makefile("rb"):
            got.append(line.strip())
            if qmp:
                c.sendall(b'{"return": {}}\n')
            if b"quit" in line:
                break
        c.close()
        srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("qmp", [False, True])
def test_quit_reads_the_greeting_and_sends_quit(tmp_path, qmp):
    got: list[bytes] = []
    sock = tmp_path / "m.sock"
    t = _serve(sock, qmp, got)
    banner = monitor.quit(sock, timeout=5, qmp=qmp)
    t.join(5)
    if qmp:
        assert banner == "QEMU 7.2.0 (QMP)"
        assert [json.loads(x)["execute"] for x in got] == ["qmp_capabilities", "quit"]
    else:
        assert banner == "QEMU 0.12.1 monitor - type 'help' for more information"
        assert got == [b"quit"]


def test_quit_without_a_monitor_is_empty(tmp_path):
    assert monitor.quit(tmp_path / "none.sock", timeout=1) == ""
    silent = socket.socket(socket.AF_UNIX)  # listens, never greets
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    t0 = time.monotonic()
    assert monitor.quit(tmp_path / "silent.sock", timeout=1) == ""
    assert time.monotonic() - t0 < 5
    silent.close()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_running_kills_qemu_when_the_block_fails(tmp_path):
    fake = _script(tmp_path / "hang", "import time; sys.stderr.write('starting\\n'); "
                                      "sys.stderr.flush(); time.sleep(1000)\n")
    with pytest.raises(RuntimeError), \
            launch.running([str(fake)], sock=tmp_path / "m.sock", qmp=False,
                           stderr=tmp_path / "err") as q:
        pid = q.proc.pid
        assert q.alive()
        raise RuntimeError("boom")
    assert not _alive(pid)


def test_running_says_what_qemu_printed_when_the_monitor_never_answers(tmp_path):
    fake = _script(tmp_path / "dies", "sys.stderr.write('could not load PC BIOS bios.bin\\n'); "
                                      "sys.exit(1)\n")
    with launch.running([str(fake)], sock=tmp_path / "m.sock", qmp=False,
                        stderr=tmp_path / "err") as q, \
            pytest.raises(VMError, match="qemu did not start") as e:
        q.connect(time.monotonic() + 10)
    assert "could not load PC BIOS" in (e.value.hint or "")
    assert os.path.exists(tmp_path / "err")
