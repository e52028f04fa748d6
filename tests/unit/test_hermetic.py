"""The distribution's binaries come from dpkg, not PATH; image info text of any qemu-img parses."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvmlab.boot import image
from kvmlab.qemu import binary

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/dpkg-query"),
                                reason="not a dpkg-based host")


def test_distro_binary_is_the_packaged_file_not_paths_first_hit(tmp_path, monkeypatch):
    shadow = tmp_path / "bin"
    shadow.mkdir()
    (shadow / "ls").write_text("#!/bin/sh\necho shadow\n")
    (shadow / "ls").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shadow}:{os.environ['PATH']}")
    assert shutil.which("ls") == str(shadow / "ls")
    ls = binary.distro_binary("ls", ("coreutils",))
    assert ls is not None and ls != shadow / "ls" and ls.name == "ls"
    assert ls.parent.name == "bin" and os.access(ls, os.X_OK)


def test_distro_binary_none_for_missing_package_or_file():
    assert binary.distro_binary("ls", ("kvmlab-no-such-package",)) is None
    assert binary.distro_binary("kvmlab-no-such-file", ("coreutils",)) is None
    assert binary.distro_binary("kvmlab-unknown") is None  # no package known for it


def test_distro_qemu_is_owned_by_qemu_system_x86():
    q = binary.distro_qemu()
    if q is None:
        pytest.skip("qemu-system-x86 is not installed")
    assert q.name == "qemu-system-x86_64" and not str(q).startswith("/usr/local")


def test_parse_info_reads_012_and_current_text():
    old = ("image: /tmp/x.qcow2\nfile format: qcow2\nvirtual size: 1.0G (1073741824 bytes)\n"
           "disk size: 136K\ncluster_size: 65536\n")
    new = ("image: x.qcow2\nfile format: qcow2\nvirtual size: 1 GiB (1073741824 bytes)\n"
           "disk size: 196 KiB\ncluster_size: 65536\nFormat specific information:\n"
           "    compat: 1.1\n    compression type: zlib\n")
    a = image.parse_info(old, "/tmp/x.qcow2")
    assert (a.path, a.format, a.virtual_size, a.compat) == (Path("/tmp/x.qcow2"), "qcow2",
                                                           1 << 30, "0.10")
    b = image.parse_info(new, "x.qcow2")
    assert (b.format, b.virtual_size, b.compat) == ("qcow2", 1 << 30, "1.1")
