"""testinfra checks of the vm step (create-image, boot-test).

Inputs (set by the tasks through KVMLAB_VERIFY_*; `invoke verify --step boot` without them reads
the last boot-test record STATE/vm/last-boot.json):
  results      path of the boot-test record (JSON list of BootResult dicts)
  image, image_size, image_format   an image made by create-image
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def _results(kvmlab_settings, verify_env):
    path = verify_env.get("results")
    if path is None:  # plain `invoke verify --step boot`: the last boot-test
        p = kvmlab_settings.state_dir / "vm" / "last-boot.json"
        path = str(p) if p.exists() else ""
    if not path:
        pytest.skip("no boot-test record to check")
    return json.loads(Path(path).read_text())


def test_qemu_process_gone(host, kvmlab_settings, verify_env):
    """No qemu process of the checked runs is left: by the run's unique -name and its pidfile."""
    for r in _results(kvmlab_settings, verify_env):
        out = host.run("ps -eo pid=,args=")
        assert out.rc == 0, out.stderr
        leftovers = [ln for ln in out.stdout.splitlines() if r["name"] in ln and "ps -eo" not in ln]
        assert not leftovers, f"qemu of run {r['name']} still running: {leftovers}"
        pidfile = host.file(r["pidfile"])
        if pidfile.exists and pidfile.content_string.strip():
            pid = pidfile.content_string.strip()
            proc = host.file(f"/proc/{pid}/cmdline")
            assert not (proc.exists and r["name"] in proc.content_string), \
                f"pid {pid} from {r['pidfile']} is still the run's qemu"


def test_serial_log_has_marker(host, kvmlab_settings, verify_env):
    for r in _results(kvmlab_settings, verify_env):
        if not r["booted"] or r["guest"] == "user-iso":
            continue
        log = host.file(r["serial_log"])
        assert log.exists, f"serial log {r['serial_log']} missing"
        assert r["marker"] in log.content.decode("latin-1"), \
            f"{r['marker']} not in {r['serial_log']}"


def _check_image(host, path: str, fmt: str, size: int) -> None:
    assert host.file(path).exists, f"{path} missing"
    out = host.run("qemu-img info --output=json %s", path)
    assert out.rc == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == fmt, f"{path} is {info['format']}, expected {fmt}"
    assert int(info["virtual-size"]) == size, f"{path}: virtual size {info['virtual-size']} != {size}"
    chk = host.run("qemu-img check %s", path) if fmt == "qcow2" else None
    assert chk is None or chk.rc == 0, f"qemu-img check {path}: {chk.stdout} {chk.stderr}"


def test_disk_image_valid(host, kvmlab_settings, verify_env):
    """The image create-image made (or the disk a boot-test attached) is what was asked for."""
    if verify_env.get("image"):
        _check_image(host, verify_env["image"], verify_env.get("image_format", "qcow2"),
                     int(verify_env["image_size"]))
        return
    checked = 0
    for r in _results(kvmlab_settings, verify_env):
        if r.get("disk") and os.path.exists(r["disk"]):
            _check_image(host, r["disk"], r["disk_format"], int(r["disk_size"]))
            checked += 1
    if not checked:
        pytest.skip("no disk image in the checked runs")
