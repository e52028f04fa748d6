"""testinfra checks of the vm step (create-image, boot-test).

Inputs (set by the tasks through KVMLAB_VERIFY_*; `invoke verify --step boot` without them reads
the last boot-test record STATE/vm/last-boot.json):
  results      path of the boot-test record (JSON list of BootResult dicts)
  image, image_size, image_format   an image made by create-image
  image_qemu_img                    the qemu-img create-image made it with

The image is read with the qemu-img its step recorded (create-image: image_qemu_img; boot-test:
each run's disk_qemu_img), never PATH's first qemu-img: after `invoke install` that is qemu-kvm
0.12's, which has no --output=json and cannot read qcow2 v3. Its text output is parsed
(kvmlab.boot.image.parse_info understands 0.12's and current releases').
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvmlab.boot.image import find_qemu_img, parse_info
from kvmlab.core.errors import ImageError


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


def _qemu_img(host, kvmlab_settings, recorded: str | None, near: str | None = None) -> str:
    """The recorded qemu-img; for records older than that field, what the step would pick."""
    if recorded:
        return recorded
    if host.backend.NAME == "local":
        return str(find_qemu_img(kvmlab_settings, near=near))
    return host.find_command("qemu-img")


def _check_image(host, path: str, fmt: str, size: int, qemu_img: str) -> None:
    assert host.file(path).exists, f"{path} missing"
    assert host.file(qemu_img).exists, f"{qemu_img} (the qemu-img that made {path}) is gone"
    out = host.run("%s info %s", qemu_img, path)
    assert out.rc == 0, f"{qemu_img} info {path}: {out.stderr.strip()}"
    try:
        info = parse_info(out.stdout, path)
    except ImageError as e:
        pytest.fail(f"{qemu_img} info {path}: {e.message} ({e.hint})")
    assert info.format == fmt, f"{path} is {info.format}, expected {fmt} (read by {qemu_img})"
    assert info.virtual_size == size, f"{path}: virtual size {info.virtual_size} != {size}"
    chk = host.run("%s check %s", qemu_img, path) if fmt == "qcow2" else None
    assert chk is None or chk.rc == 0, f"{qemu_img} check {path}: {chk.stdout} {chk.stderr}"


def test_disk_image_valid(host, kvmlab_settings, verify_env):
    """The image create-image made (or the disk a boot-test attached) is what was asked for."""
    if verify_env.get("image"):
        _check_image(host, verify_env["image"], verify_env.get("image_format", "qcow2"),
                     int(verify_env["image_size"]),
                     _qemu_img(host, kvmlab_settings, verify_env.get("image_qemu_img")))
        return
    checked = 0
    for r in _results(kvmlab_settings, verify_env):
        if r.get("disk") and os.path.exists(r["disk"]):
            _check_image(host, r["disk"], r["disk_format"], int(r["disk_size"]),
                         _qemu_img(host, kvmlab_settings, r.get("disk_qemu_img"), r.get("qemu")))
            checked += 1
    if not checked:
        pytest.skip("no disk image in the checked runs")


def test_kvm_boot_counted_kvm_exits(host, kvmlab_settings, verify_env):
    """A boot the monitor says ran under KVM moved KVM's exit counter, where it was readable."""
    for r in _results(kvmlab_settings, verify_env):
        if r.get("accel") == "kvm" and r.get("booted") and r.get("kvm_exits") is not None:
            assert r["kvm_exits"] > 0, f"{r['name']}: KVM said enabled but counted no exits"
