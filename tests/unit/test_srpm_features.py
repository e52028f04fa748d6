"""kvmlab.build.features: the feature report of a build against the recipe's (RHEL's) configure line."""
from __future__ import annotations

from pathlib import Path

from kvmlab.build.features import feature_report, format_report
from kvmlab.model.recipe import parse_recipe

RECIPE = """
name = "el6demo"
version = "1"
[source]
file = "x.src.rpm"
urls = ["https://example.invalid/x.src.rpm"]
sha256 = "unknown"
format = "srpm"
[build]
configure = ["./configure", "--audio-drv-list=pa,alsa", "--enable-spice", "--enable-glusterfs",
             "--enable-werror", "--disable-sdl", "--trace-backend=dtrace", "--enable-kvm"]
[artifacts]
binaries = ["x86_64-softmmu/qemu-system-x86_64"]
[builders.debian12]
configure_drop = ["--enable-glusterfs", "--trace-backend=dtrace"]
configure_add = ["--trace-backend=nop", "--enable-lzo"]
notes = "no glusterfs here"
[builders.centos6]
"""


def _tree(tmp_path: Path, host: str, target: str) -> Path:
    b = tmp_path / "build"
    (b / "x86_64-softmmu").mkdir(parents=True)
    (b / "config-host.mak").write_text(host)
    (b / "x86_64-softmmu" / "config-target.mak").write_text(target)
    return b


def test_report_enabled_dropped_missing_added(tmp_path):
    p = tmp_path / "el6demo.toml"
    p.write_text(RECIPE)
    r = parse_recipe(p)
    b = _tree(tmp_path, "CONFIG_AUDIO_DRIVERS=pa alsa\nCONFIG_PA=y\nTRACE_BACKEND=nop\n"
                        "CONFIG_LZO=y\n", "CONFIG_KVM=y\n")
    rows = {x.feature: x for x in feature_report(r, "debian12", b)}
    assert rows["audio=pa"].status == rows["audio=alsa"].status == "enabled"
    assert rows["kvm"].status == "enabled"
    assert rows["spice"].status == "missing"          # asked for, configure turned it off
    assert "configure turned it off" in rows["spice"].note
    assert rows["glusterfs"].status == "dropped" and "no glusterfs here" in rows["glusterfs"].note
    assert rows["trace-backend=dtrace"].status == "dropped"
    assert rows["trace-backend=nop"].status == "enabled"
    assert rows["lzo"].note == "added for debian12"
    assert "sdl" not in rows and "werror" not in rows  # disabled / not a feature
    lines = format_report(list(rows.values()))
    assert lines[0].startswith("features enabled (5): ")
    assert "  spice: missing - configure turned it off" in lines[1]


def test_report_without_a_build_tree(tmp_path):
    p = tmp_path / "el6demo.toml"
    p.write_text(RECIPE)
    rows = feature_report(parse_recipe(p), "centos6", None)
    assert {x.status for x in rows} == {"not checked"}
    assert [x.feature for x in rows][:2] == ["audio=pa", "audio=alsa"]
