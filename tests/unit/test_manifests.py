"""The typed records read what kvmlab wrote before the redesign, and write it back unchanged."""
import json
from pathlib import Path

import pytest

from kvmlab.model.manifests import (
    BuildManifest,
    InstallManifest,
    InstallTarget,
    LabLock,
    ManifestError,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "pre-redesign"


@pytest.mark.parametrize("cls, name", [(BuildManifest, "build-manifest.json"),
                                       (InstallManifest, "install-manifest.json"),
                                       (LabLock, "lab.lock.json")])
def test_files_written_before_the_redesign_round_trip(cls, name):
    raw = json.loads((DATA / name).read_text())
    rec = cls.load(DATA / name)
    assert rec.to_dict() == raw


def test_build_manifest_fields_are_typed():
    m = BuildManifest.load(DATA / "build-manifest.json")
    assert m.recipe == "qemu-kvm-0.12.1.2" and m.builder == "debian12"
    assert m.runtime_deps is None          # written before runtime deps were recorded
    qemu = m.artifact("bin/qemu-system-x86_64")
    assert qemu is not None and qemu.kind == "binary" and qemu.size > 1_000_000
    assert m.datadir == "/usr/local/share/qemu"
    assert m.get("timings")["run"] > 0      # an extra key is still there


def test_install_manifest_and_lab_lock_read():
    im = InstallManifest.load(DATA / "install-manifest.json")
    assert im.prefix == "/usr/local" and im.entry("/usr/local/bin/qemu-system-x86_64")
    lock = LabLock.load(DATA / "lab.lock.json")
    assert lock.recipe["name"] == "qemu-kvm-0.12.1.2" and lock.installed


@pytest.mark.parametrize("text, needle", [("[]", "JSON object"), ("{", "cannot read"),
                                          ('{"artifacts": []}', "names no recipe")])
def test_bad_manifests_are_clear_errors(tmp_path, text, needle):
    p = tmp_path / "m.json"
    p.write_text(text)
    with pytest.raises(ManifestError) as e:
        BuildManifest.load(p)
    assert needle in e.value.message
    with pytest.raises(ManifestError, match="no build manifest"):
        BuildManifest.load(tmp_path / "missing.json")


def test_install_target_is_resolved_once():
    t = InstallTarget.of("/usr/local/", "/tmp/stage/")
    assert t == InstallTarget("/usr/local", "/tmp/stage")
    assert t.root == Path("/tmp/stage/usr/local")
    assert t.path("bin/qemu-img") == Path("/tmp/stage/usr/local/bin/qemu-img")
    assert t.path("/usr/share/qemu") == Path("/tmp/stage/usr/share/qemu")
    assert InstallTarget.of("/usr", "/").root == Path("/usr")
    with pytest.raises(ManifestError):
        InstallTarget.of("usr/local")
