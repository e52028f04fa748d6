"""The nested lab's pure parts: the build preflight, the in-guest command line, the record, and
the KVM exit counter (read from a real file standing in for debugfs)."""
from __future__ import annotations

import json
import shlex

import pytest

from kvmlab.boot.kvmstat import ExitCounter, read_exits
from kvmlab.core.settings import load_settings
from kvmlab.nested import steps
from kvmlab.nested.record import NestedError, NestedOptions, NestedRecord


def test_missing_build_names_the_build_command(tmp_path):
    s = load_settings({"state_dir": tmp_path / "state", "cache": tmp_path / "cache"})
    with pytest.raises(NestedError) as e:
        steps.check_builds(s, NestedOptions())
    assert "no kvm-kmod-6.1 build" in e.value.message
    assert "invoke build --recipe kvm-kmod-6.1 --builder debian12" in e.value.hint
    (s.out("kvm-kmod-6.1", "debian12")).mkdir(parents=True)
    (s.out("kvm-kmod-6.1", "debian12") / "manifest.json").write_text("{}")
    with pytest.raises(NestedError) as e:
        steps.check_builds(s, NestedOptions())
    assert "no qemu-kvm-0.12.1.2 build" in e.value.message


def test_kvmlab_command_runs_the_bundle_inside():
    cmd = steps.kvmlab_command(["load-modules", "--ko", "/x/kvm.ko,/x/kvm-amd.ko", "--json"])
    words = shlex.split(cmd.split("&& ", 1)[1])
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    assert env["PYTHONPATH"] == f"{steps.ROOT}/lib"
    assert env["KVMLAB_STATE_DIR"].startswith(steps.ROOT)
    assert words[words.index("python3"):] == ["python3", "-m", "kvmlab", "load-modules", "--ko",
                                               "/x/kvm.ko,/x/kvm-amd.ko", "--json"]


def test_record_json_and_lock_entry(tmp_path):
    rec = NestedRecord(run="r1", run_dir=str(tmp_path / "r1"), options={"cpu": "max"},
                       verdict="KVM usable", accel="kvm", kvm_exits=42, dmesg="/x/dmesg.txt")
    p = rec.write()
    assert json.loads(p.read_text())["kvm_exits"] == 42 and rec.ok
    entry = rec.lock_entry()
    assert entry["verdict"] == "KVM usable" and "run_dir" not in entry and "dmesg" not in entry


def test_exit_counter_delta_from_a_counter_file(tmp_path):
    f = tmp_path / "exits"
    assert read_exits(f) is None
    c = ExitCounter(f)
    c.start()
    assert c.delta is None                      # unreadable: no evidence either way
    f.write_text("100\n")
    c = ExitCounter(f)
    c.start()
    f.write_text("55498\n")
    c.sample(force=True)
    f.write_text("0\n")                          # the VM is gone: its exits left the sum
    c.sample(force=True)
    assert c.delta == 55398
