"""patch: series parsing with conditions, header lint, all-or-nothing application with no fuzz."""
import dataclasses
from pathlib import Path

import pytest

from kvmlab.core.errors import PatchError
from kvmlab.model.recipe import BuilderConfig
from kvmlab.source.patch import apply_series, lint_patch, read_series
from support.fakeqemu import write_fake_qemu_tree
from support.pipeline import fake_project, make_patch, tree_hashes


@pytest.fixture
def tree(tmp_path):
    return write_fake_qemu_tree(tmp_path / "work" / "src")


def edit(tree, rel, old, new):
    text = (tree / rel).read_text()
    assert old in text
    return make_patch(rel, text, text.replace(old, new, 1), what=f"{rel}: {old} -> {new}")


def project(tmp_path, monkeypatch, patches, series=None, extra=""):
    s, r = fake_project(tmp_path, monkeypatch, patches=patches, extra=extra)
    if series is not None:
        (s.patches_dir / r.name / "series").write_text(series)
    return s, r


def test_third_patch_fails_tree_byte_identical(tmp_path, monkeypatch, kvmlab_env, tree):
    pristine = (tree / "vl.c").read_text()
    patches = {
        "0001-version.patch": edit(tree, "VERSION", "0.12.1", "0.12.1-kvmlab"),
        "0002-kvm.patch": edit(tree, "KVM_VERSION", "fake", "fake2"),
        # context taken from a different vl.c: must not apply (no fuzz)
        "0003-vl.patch": make_patch("vl.c", "/* other */\n" + pristine,
                                    "/* other */\n" + pristine.replace("\n", "\n/*x*/\n", 1)),
    }
    s, r = project(tmp_path, monkeypatch, patches)
    entries = read_series(s.patches_dir, r, "debian12")
    before = tree_hashes(tree)
    with pytest.raises(PatchError) as e:
        apply_series(tree, entries)
    assert "0003-vl.patch" in e.value.message
    assert "vl.c: hunk #1 FAILED" in e.value.message
    assert tree_hashes(tree) == before
    assert sorted(p.name for p in tree.parent.iterdir()) == ["src"]  # scratch removed


def test_series_applies_and_records_touched_files(tmp_path, monkeypatch, kvmlab_env, tree):
    patches = {"0001-version.patch": edit(tree, "VERSION", "0.12.1", "0.12.1-kvmlab"),
               "0002-kvm.patch": edit(tree, "KVM_VERSION", "fake", "fake-patched")}
    s, r = project(tmp_path, monkeypatch, patches)
    files = apply_series(tree, read_series(s.patches_dir, r, "debian12"))
    assert (tree / "VERSION").read_text() == "0.12.1-kvmlab\n"
    assert set(files) == {"VERSION", "KVM_VERSION"}
    assert not list(tree.rglob("*.orig")) and not list(tree.rglob("*.rej"))


def test_dry_run_leaves_tree_alone(tmp_path, monkeypatch, kvmlab_env, tree):
    s, r = project(tmp_path, monkeypatch, {"1.patch": edit(tree, "VERSION", "0.12.1", "9")})
    before = tree_hashes(tree)
    assert apply_series(tree, read_series(s.patches_dir, r, "debian12"), dry_run=True)
    assert tree_hashes(tree) == before


def test_already_applied_patch_is_named(tmp_path, monkeypatch, kvmlab_env, tree):
    s, r = project(tmp_path, monkeypatch, {"1.patch": edit(tree, "VERSION", "0.12.1", "9")})
    entries = read_series(s.patches_dir, r, "debian12")
    apply_series(tree, entries)
    with pytest.raises(PatchError, match=r"patch 1.patch does not apply: VERSION: already applied"):
        apply_series(tree, entries)


def test_conditional_patch_follows_recipe_option(tmp_path, monkeypatch, kvmlab_env, tree):
    p = {"base.patch": edit(tree, "VERSION", "0.12.1", "0.12.1-b"),
         "debug.patch": edit(tree, "KVM_VERSION", "fake", "debug")}
    series = "# comment\n\nbase.patch   # trailing comment\ndebug.patch if=debug-bios-path\n"
    for value, active in (("false", False), ("true", True)):
        s, r = project(tmp_path / value, monkeypatch, p, series,
                       extra=f"\n[options]\ndebug-bios-path = {value}\n")
        entries = read_series(s.patches_dir, r, "debian12")
        assert [(e.name, e.condition, e.active) for e in entries] == \
            [("base.patch", None, True), ("debug.patch", "debug-bios-path", active)]


@pytest.mark.parametrize("series,needle", [
    ("base.patch if=nosuch\n", "unknown option 'nosuch'"),
    ("base.patch when=x\n", "series:1: cannot parse"),
    ("\n# c\nmissing.patch\n", "series:3: patch file"),
    ("../escape.patch\n", "cannot parse"),
])
def test_bad_series_lines_name_file_and_line(tmp_path, monkeypatch, kvmlab_env, tree, series,
                                             needle):
    s, r = project(tmp_path, monkeypatch, {"base.patch": edit(tree, "VERSION", "0.12.1", "1")},
                   series)
    with pytest.raises(PatchError) as e:
        read_series(s.patches_dir, r, "debian12")
    assert needle in e.value.message


@pytest.mark.parametrize("header,needle", [
    ("", "'Fixes:'"),
    ("Fixes: x\nFor: gcc 12\nLog: err\nUpstream: N/A: local\n\n", "'Failing-log:'"),
    ("Fixes: x\nFor: gcc 12\nFailing-log: e\nUpstream: maybe later\n\n", "URL or 'N/A: reason'"),
    ("Fixes: x\nFor:\nFailing-log: e\nUpstream: https://example.org/c/1\n\n", "'For:'"),
    ("Fixes:\n  continued on the next line\nFor: gcc\nFailing-log: e\nUpstream: N/A: t\n\n", None),
])
def test_lint_rejects_patches_without_header(tmp_path, monkeypatch, kvmlab_env, tree, header,
                                             needle):
    text = (tree / "VERSION").read_text()
    bad = make_patch("VERSION", text, "2\n", header=header)
    s, r = project(tmp_path, monkeypatch, {"bad.patch": bad})
    if needle is None:
        assert read_series(s.patches_dir, r, "debian12")[0].name == "bad.patch"
        return
    with pytest.raises(PatchError) as e:
        read_series(s.patches_dir, r, "debian12")
    assert "bad.patch" in e.value.message and needle in e.value.message


def test_lint_accepts_upstream_url_and_wants_a_diff(tmp_path):
    ok = tmp_path / "ok.patch"
    ok.write_text(make_patch("f", "a\n", "b\n", header="Fixes: x\nFor: gcc 12\nFailing-log: l\n"
                                                     "Upstream: https://example.org/commit/1\n"))
    assert lint_patch(ok) == []
    nodiff = tmp_path / "nodiff.patch"
    nodiff.write_text("Fixes: x\nFor: y\nFailing-log: z\nUpstream: N/A: none\n")
    assert "no unified diff" in lint_patch(nodiff)[0]


def test_missing_series_file_and_builder_without_series(tmp_path, monkeypatch, kvmlab_env):
    s, r = project(tmp_path, monkeypatch, {})
    (s.patches_dir / r.name / "series").unlink()
    with pytest.raises(PatchError, match="cannot read the patch series"):
        read_series(s.patches_dir, r, "debian12")
    no_series = dataclasses.replace(r, builders={"debian12": BuilderConfig("debian12")})
    assert read_series(s.patches_dir, no_series, "debian12") == []


def test_shipped_series_are_valid():
    """Every series in the repo parses and each patch has the required header."""
    from kvmlab.model.recipe import list_recipes
    repo = Path(__file__).resolve().parents[2]
    for r in list_recipes(repo / "recipes"):
        if isinstance(r, Exception):
            continue
        for builder in r.builders:
            for e in read_series(repo / "patches", r, builder):
                assert e.path.is_file()


def test_patch_for_a_missing_file_names_it(tmp_path, monkeypatch, kvmlab_env, tree):
    s, r = project(tmp_path, monkeypatch, {"x.patch": make_patch("nosuch.c", "a\n", "b\n")})
    with pytest.raises(PatchError, match="patch x.patch does not apply: nosuch.c: file to patch "
                                         "not found"):
        apply_series(tree, read_series(s.patches_dir, r, "debian12"))


def test_failing_patch_leaves_no_half_applied_hunks(tmp_path, monkeypatch, kvmlab_env, tree):
    """The one patch runner dry-runs first: even patching in place (scratch=False), a patch whose
    second hunk fails leaves its first file untouched."""
    version = (tree / "VERSION").read_text()
    good = edit(tree, "VERSION", "0.12.1", "0.12.1-kvmlab")
    bad = make_patch("vl.c", "/* other */\n", "/* changed */\n")
    both = good + bad[bad.index("--- "):]
    s, r = project(tmp_path, monkeypatch, {"1.patch": both})
    with pytest.raises(PatchError, match=r"patch 1.patch does not apply: vl.c: hunk #1 FAILED"):
        apply_series(tree, read_series(s.patches_dir, r, "debian12"), scratch=False)
    assert (tree / "VERSION").read_text() == version


def test_patch_stamp_from_before_stamps_is_read_but_not_fresh(tmp_path, monkeypatch, kvmlab_env):
    """A patch.json written before kvmlab.core.stamps (the record's keys at its top) is still
    read (the lab lock compares its patches), and prepare redoes the tree instead of trusting it."""
    import json

    from kvmlab.source.prepare import patch_stamp_path, prepare, read_patch_stamp
    s, r = fake_project(tmp_path, monkeypatch)
    checkout = write_fake_qemu_tree(tmp_path / "checkout")
    first = prepare(s, r, "debian12", source=checkout)
    record = read_patch_stamp(s, r)
    assert record["patches"] == first.patches and record["source_sha256"] == first.source_sha256
    patch_stamp_path(s, r).write_text(json.dumps(record))  # the old, flat format
    assert read_patch_stamp(s, r) == record
    again = prepare(s, r, "debian12", source=checkout)
    assert not again.noop and again.unpacked
    assert json.loads(patch_stamp_path(s, r).read_text())["record"] == record
    assert prepare(s, r, "debian12", source=checkout).noop
