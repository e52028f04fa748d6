"""Checks after `invoke fetch`: the source is in the cache (or the --source dir exists) and its
sha256 is the one recorded in fetch.json, pinned in the recipe or locked in kvmlab.lock."""
import json

import pytest

from kvmlab.source.fetch import cache_path, stamp_path
from kvmlab.source.lock import expected_sha256


@pytest.fixture(scope="module")
def stamp(host, kvmlab_settings, recipe):
    f = host.file(str(stamp_path(kvmlab_settings, recipe)))
    assert f.exists, f"{f.path} missing: run `invoke fetch --recipe {recipe.name}`"
    data = json.loads(f.content_string)  # a kvmlab.core.stamps.Stamp file
    assert data.get("step") == "fetch" and isinstance(data.get("record"), dict), \
        f"{f.path} is not a fetch stamp: run `invoke fetch --recipe {recipe.name}`"
    return data["record"]


def test_stamp_names_the_recipe_source(stamp, recipe):
    assert stamp["recipe"] == recipe.name and stamp["file"] == recipe.source.file


def test_cached_file_has_the_recorded_sha256(host, stamp, kvmlab_settings, recipe):
    if stamp["kind"] == "dir":
        assert host.file(stamp["path"]).is_directory
        return
    assert stamp["path"] == str(cache_path(kvmlab_settings, stamp["sha256"], recipe.source.file))
    f = host.file(stamp["path"])
    assert f.is_file and f.size == stamp["size"]
    assert f.sha256sum == stamp["sha256"]


def test_sha256_is_pinned_or_locked(host, stamp, kvmlab_settings, recipe):
    if stamp["kind"] == "dir":
        pytest.skip("a --source directory is used as is (its content hash is recorded)")
    if recipe.source.pinned:
        assert stamp["sha256"] == recipe.source.sha256
    else:
        lock = json.loads(host.file(str(kvmlab_settings.lock)).content_string)
        assert lock["sources"][f"{recipe.name}/{recipe.source.file}"]["sha256"] == stamp["sha256"]
        assert expected_sha256(kvmlab_settings, recipe)[0] == stamp["sha256"]


def test_no_partial_download_left(host, kvmlab_settings, recipe):
    part = kvmlab_settings.sources_cache / ".partial" / f"{recipe.source.file}.part"
    assert not host.file(str(part)).exists
