"""install / uninstall logic on a synthetic build output (no compiler, no qemu, no daemons)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from kvmlab.core.fsutil import sha256_file
from kvmlab.install import txn
from support.install import make_home, tree_state


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def env(tmp_path, monkeypatch):
    from kvmlab.core.settings import load_settings
    from kvmlab.model.recipe import load_recipe
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("KVMLAB_HOME", str(home))
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("KVMLAB_RECIPE", "fake-qemu")
    monkeypatch.setenv("KVMLAB_BUILDER", "native")
    s = load_settings()
    r = load_recipe(s.recipes_dir, "fake-qemu")
    return s, r, tmp_path


def write_out(s, r, contents: dict[str, bytes] | None = None) -> Path:
    """A build output with the contract's layout; binaries are just bytes here."""
    out = s.out(r.name, "native")
    arts = []
    for kind, key, sub, mode in (("binary", "binaries", "bin", 0o755),
                                 ("firmware", "firmware", "pc-bios", 0o644),
                                 ("option_rom", "option_roms", "pc-bios", 0o644)):
        for rel in r.artifacts[key]:
            name = os.path.basename(rel)
            data = (contents or {}).get(name, f"{name} v1\n".encode())
            p = out / sub / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(mode)
            arts.append({"path": f"{sub}/{name}", "kind": kind, "sha256": _sha(data),
                         "size": len(data), "mode": f"{mode:04o}"})
    (out / "manifest.json").write_text(json.dumps({
        "recipe": r.name, "builder": "native", "artifacts": arts,
        "config": {"prefix": "/usr/local", "datadir": "/usr/local/share/qemu"},
        "build_dir": ""}))
    return out


def test_missing_build_output_says_build_first(env):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    s, r, tmp = env
    with pytest.raises(InstallError) as ei:
        inst.install(s, r, "native", destdir=str(tmp / "d"))
    assert ei.value.message.startswith("no build artifacts for fake-qemu/native")
    assert "invoke build --recipe fake-qemu --builder native" in ei.value.hint


def test_incomplete_build_output_is_refused(env):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    s, r, tmp = env
    out = write_out(s, r)
    (out / "bin/qemu-io").unlink()
    with pytest.raises(InstallError, match="build output incomplete"):
        inst.install(s, r, "native", destdir=str(tmp / "d"))


def test_unknown_mode(env):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    s, r, tmp = env
    with pytest.raises(InstallError, match="unknown install mode 'move'"):
        inst.install(s, r, "native", mode="move")


def test_manifest_path_one_per_destdir_and_prefix(env):
    from kvmlab import install as inst
    s, _r, _tmp = env
    a = inst.manifest_path(s, "", "/usr/local")
    assert a == inst.manifest_path(s, None, "/usr/local/")
    assert a.parent == s.state_dir / "installs"
    assert len({a, inst.manifest_path(s, "/tmp/x", "/usr/local"),
                inst.manifest_path(s, "", "/opt"), inst.manifest_path(s, "/tmp/x", "/opt")}) == 4


def test_dry_run_writes_nothing(env):
    from kvmlab import install as inst
    s, r, tmp = env
    write_out(s, r)
    res = inst.install(s, r, "native", destdir=str(tmp / "d"), dry_run=True)
    assert {x.status for x in res.rows} == {"would install"}
    assert not (tmp / "d").exists() and not (s.state_dir / "installs").exists()


def test_copy_install_records_and_is_idempotent(env):
    from kvmlab import install as inst
    s, r, tmp = env
    write_out(s, r)
    res = inst.install(s, r, "native", destdir=str(tmp / "d"))
    m = json.loads(res.manifest_path.read_text())
    paths = {e["path"] for e in m["files"]}
    assert paths == {str(tmp / "d/usr/local/bin" / n) for n in
                     ("qemu-system-x86_64", "qemu-img", "qemu-io", "qemu-nbd")}
    for e in m["files"]:
        st = os.stat(e["path"])
        assert e["sha256"] == sha256_file(e["path"]) and e["mode"] == "0755"
        assert (e["uid"], e["gid"]) == (st.st_uid, st.st_gid) and e["replaced"] is None
    again = inst.install(s, r, "native", destdir=str(tmp / "d"))
    assert again.noop and {x.status for x in again.rows} == {"already correct"}


def test_update_of_our_own_file_keeps_the_original_backup(env):
    from kvmlab import install as inst
    s, r, tmp = env
    bindir = tmp / "d/usr/local/bin"
    bindir.mkdir(parents=True)
    (bindir / "qemu-img").write_bytes(b"distro qemu-img\n")
    (bindir / "qemu-img.kvmlab-bak").write_bytes(b"someone else's backup\n")
    before = tree_state(tmp / "d")
    write_out(s, r)
    res = inst.install(s, r, "native", destdir=str(tmp / "d"))
    row = next(x for x in res.rows if x.path.endswith("/qemu-img"))
    assert row.backup == str(bindir / "qemu-img.kvmlab-bak.1")      # never clobbers
    write_out(s, r, {"qemu-img": b"qemu-img v2\n"})
    res2 = inst.install(s, r, "native", destdir=str(tmp / "d"))
    row2 = next(x for x in res2.rows if x.path.endswith("/qemu-img"))
    assert row2.status == "updated" and row2.backup is None
    assert not (bindir / "qemu-img.kvmlab-bak.2").exists()
    inst.uninstall(s, destdir=str(tmp / "d"))
    assert tree_state(tmp / "d") == before


def test_uninstall_leaves_files_changed_since_unless_forced(env):
    from kvmlab import install as inst
    s, r, tmp = env
    write_out(s, r)
    inst.install(s, r, "native", destdir=str(tmp / "d"))
    edited = tmp / "d/usr/local/bin/qemu-nbd"
    edited.write_bytes(b"edited by hand\n")
    u = inst.uninstall(s, destdir=str(tmp / "d"))
    assert [p for p, _ in u.skipped] == [str(edited)] and edited.exists()
    assert len(u.removed) == 3
    u2 = inst.uninstall(s, destdir=str(tmp / "d"), force=True)
    assert u2.removed == [str(edited)] and not (tmp / "d").exists()


def test_uninstall_nothing_installed(env):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    s, r, tmp = env
    with pytest.raises(InstallError, match="nothing installed by kvmlab under"):
        inst.uninstall(s, destdir=str(tmp / "d"))


def test_parse_strace_keeps_absolute_firmware_paths():
    from kvmlab.install.probe import _parse_strace
    text = "\n".join([
        '123 access("bios-256k.bin", R_OK) = -1 ENOENT (No such file or directory)',
        '123 access("/p/bin/../share/qemu/bios-256k.bin", R_OK) = -1 ENOENT (No such file)',
        '[pid 124] openat(AT_FDCWD, "/p/share/seabios/bios-256k.bin", O_RDONLY) = 3',
        'openat(AT_FDCWD, "/lib/x86_64-linux-gnu/libz.so.1", O_RDONLY|O_CLOEXEC) = 3',
        '125 openat(AT_FDCWD, "/p/share/qemu/vapic.bin", O_RDONLY <unfinished ...>',
        'faccessat2(AT_FDCWD, "/d/vgabios.bin", R_OK, 0) = 0',
    ])
    assert _parse_strace(text) == [("/p/share/qemu/bios-256k.bin", False),
                                   ("/p/share/seabios/bios-256k.bin", True),
                                   ("/d/vgabios.bin", True)]


def test_explain_failure_names_the_paths():
    from kvmlab.install import ProbeRun, explain_failure
    p = ProbeRun(Path("/q"), [], False, 1, "qemu: could not load PC BIOS 'bios.bin'\n", "",
                 [("/x/share/qemu/bios.bin", False)], ["bios.bin"], [], {}, True)
    text = explain_failure(p)
    assert "could not load PC BIOS 'bios.bin'" in text
    assert "it tried for bios.bin: /x/share/qemu/bios.bin" in text


def test_debug_bios_path_lines_count_as_observations(tmp_path):
    """Without strace, a binary built with debug-bios-path still tells where it looked."""
    from kvmlab.install import run_probe
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\n"
                    "case \"$1\" in -version)\n"
                    "  echo 'QEMU PC emulator version 0.12.1'; exit 0;; esac\n"
                    "echo \"qemu: firmware directory '/x/share/qemu' "
                    "(next to the executable)\" >&2\n"
                    "echo \"qemu: firmware 'bios.bin' not found at '/x/share/qemu/bios.bin': "
                    "No such file or directory\" >&2\n"
                    "echo \"qemu: could not load PC BIOS 'bios.bin'\" >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    p = run_probe(fake, use_strace=False, timeout=10)
    assert not p.ok and p.missing_fatal == ["bios.bin"]
    assert p.attempts == [("/x/share/qemu/bios.bin", False)]
    assert p.reported_dirs == [("/x/share/qemu", "next to the executable")]


def test_ctrl_c_mid_install_rolls_back(env, monkeypatch):
    from kvmlab import install as inst
    s, r, tmp = env
    bindir = tmp / "d/usr/local/bin"
    bindir.mkdir(parents=True)
    (bindir / "qemu-io").write_bytes(b"previous\n")
    before = tree_state(tmp / "d")
    write_out(s, r)
    calls = {"n": 0}
    real = txn._copy_data

    def interrupted(src, dst):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(txn, "_copy_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        inst.install(s, r, "native", destdir=str(tmp / "d"))
    assert tree_state(tmp / "d") == before
    assert not inst.manifest_path(s, str(tmp / "d"), "/usr/local").exists()


def test_manifest_written_before_the_redesign_is_listed_and_uninstalled(env):
    """tests/data/pre-redesign/install-manifest.json (a real lab run of the old code), moved
    under a DESTDIR so that nothing real is touched: list_manifests reads it, uninstall undoes
    it entry by entry (a file changed since is left alone) and keeps the rest of the record."""
    from kvmlab import install as inst
    s, _r, tmp = env
    old = Path(__file__).resolve().parents[1] / "data" / "pre-redesign" / "install-manifest.json"
    d = tmp / "d"
    raw = json.loads(old.read_text().replace('"/usr/local', f'"{d}/usr/local'))
    raw["destdir"], raw["prefix"] = str(d), "/usr/local"
    mpath = inst.manifest_path(s, str(d), "/usr/local")
    mpath.parent.mkdir(parents=True)
    mpath.write_text(json.dumps(raw))
    [(p, m)] = inst.list_manifests(s)
    assert p == mpath and m.prefix == "/usr/local" and len(m.files) == len(raw["files"]) == 51
    assert m.installs == raw["installs"] and m.bios["method"] == "0.12 rule"
    bios = d / "usr/local/share/qemu/bios.bin"
    bios.parent.mkdir(parents=True)
    bios.write_bytes(b"not what kvmlab wrote\n")
    u = inst.uninstall(s, destdir=str(d))
    assert u.skipped == [(str(bios), "changed since kvmlab installed it (use --force)")]
    assert len(u.removed) == 50 and bios.read_bytes() == b"not what kvmlab wrote\n"
    left = json.loads(mpath.read_text())
    assert [e["path"] for e in left["files"]] == [str(bios)]
    assert left["installs"] == raw["installs"] and left["schema"] == 1
