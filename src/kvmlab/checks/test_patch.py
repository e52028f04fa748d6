"""Checks after `invoke patch`: the tree exists, comes from the fetched source and has exactly the
builder's current series applied (patch files unchanged, every touched file as recorded)."""
import json

import pytest

from kvmlab.source.fetch import stamp_path
from kvmlab.source.patch import read_series
from kvmlab.source.prepare import patch_stamp_path


def _record(host, path, step, hint):
    """The record of a kvmlab.core.stamps.Stamp file on the host."""
    f = host.file(str(path))
    assert f.exists, f"{f.path} missing: {hint}"
    data = json.loads(f.content_string)
    assert data.get("step") == step and isinstance(data.get("record"), dict), \
        f"{f.path} is not a {step} stamp: {hint}"
    return data["record"]


@pytest.fixture(scope="module")
def stamp(host, kvmlab_settings, recipe):
    return _record(host, patch_stamp_path(kvmlab_settings, recipe), "patch",
                   f"run `invoke patch --recipe {recipe.name}`")


def test_tree_exists(host, stamp):
    assert host.file(stamp["src_dir"]).is_directory


def test_tree_comes_from_the_fetched_source(host, stamp, kvmlab_settings, recipe):
    fetched = _record(host, stamp_path(kvmlab_settings, recipe), "fetch",
                      f"run `invoke fetch --recipe {recipe.name}`")
    assert stamp["source_sha256"] == fetched["sha256"]


def test_series_is_the_builders_current_one(stamp, kvmlab_settings, recipe):
    entries = read_series(kvmlab_settings.patches_dir, recipe, stamp["builder"])
    assert stamp["patches"] == [e.record() for e in entries if e.active]


def test_patch_files_unchanged_since_applied(host, stamp, kvmlab_settings, recipe):
    for p in stamp["patches"]:
        f = host.file(str(kvmlab_settings.patches_dir / recipe.name / p["name"]))
        assert f.sha256sum == p["sha256"], f"{p['name']} changed after it was applied"


def test_touched_files_are_as_patched(host, stamp):
    for rel, sha in stamp["files"].items():
        f = host.file(f"{stamp['src_dir']}/{rel}")
        if sha is None:
            assert not f.exists, f"{rel} should have been deleted by the series"
        else:
            assert f.sha256sum == sha, f"{rel} differs from the patched version"
