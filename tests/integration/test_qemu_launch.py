"""The qemu room against Debian's real qemu: the probe, a headless launch answering the monitor
(HMP through ``quit``, QMP through ``Monitor``), and qemu gone afterwards."""
from __future__ import annotations

import time

import pytest

from kvmlab.qemu import binary, launch, monitor

pytestmark = pytest.mark.qemu


def test_headless_launch_answers_quit_and_exits(distro_qemu, tmp_path):
    qb = binary.probe_qemu(distro_qemu)
    assert binary.version_line(distro_qemu).startswith("QEMU emulator version")
    assert binary.l_help(distro_qemu)  # qemu >= 5 lists its data directories
    sock = tmp_path / "m.sock"
    argv = [str(qb.path), *launch.headless_args(qb, sock), "-machine", "pc", "-accel", "tcg"]
    with launch.running(argv, sock=sock, qmp=False, stderr=tmp_path / "err") as q:
        deadline = time.monotonic() + 30
        banner = ""
        while not banner and q.alive() and time.monotonic() < deadline:
            banner = monitor.quit(sock, timeout=5) if sock.exists() else ""
            time.sleep(0.02)
        assert banner.startswith("QEMU") and "monitor" in banner, banner
        assert q.wait(10), "qemu did not exit after quit"
    err = (tmp_path / "err").read_text()
    assert "deprecated" not in err, err  # the version's own socket options


def test_qmp_monitor_reports_tcg(distro_qemu, tmp_path):
    qb = binary.probe_qemu(distro_qemu)
    sock = tmp_path / "q.sock"
    argv = [str(qb.path), "-S", *qb.display_args, "-accel", "tcg", *qb.monitor_args(sock)]
    with launch.running(argv, sock=sock, qmp=qb.uses_qmp, stderr=tmp_path / "err") as q:
        q.connect(time.monotonic() + 30)
        assert q.monitor.banner.startswith(f"QEMU {qb.version_tuple[0]}.")
        assert q.monitor.kvm_enabled() is False
        q.monitor.quit()
        assert q.wait(10)
