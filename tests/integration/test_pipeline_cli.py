"""`invoke fetch` / `invoke patch` as a user runs them (fake project via KVMLAB_* variables):
results, no-ops, testinfra checks, and one clear error line (no traceback) for user errors."""
import pytest

from support.fakeqemu import make_fake_qemu_tarball, tree_files, write_fake_qemu_tree
from support.httpserver import LoopbackServer
from support.pipeline import fake_project, make_patch, tree_hashes

pytestmark = pytest.mark.slow  # each test runs `invoke` (a few seconds with its checks)

VERSION = tree_files()["VERSION"][0].decode()
KVM = tree_files()["KVM_VERSION"][0].decode()
P1 = make_patch("VERSION", VERSION, "0.12.1-kvmlab\n", what="version suffix")
P2 = make_patch("KVM_VERSION", KVM, "qemu-kvm-patched\n", what="kvm version")
P3_BAD = make_patch("VERSION", "0.0.0\n", "1.1.1\n", what="does not apply")


def one_error(res):
    """The CLI failed with one error line (+ optional hint) and no traceback."""
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def test_fetch_patch_noop_and_verify(tmp_path, monkeypatch, kvmlab_env, cli):
    s, r = fake_project(tmp_path, monkeypatch, patches={"0001-v.patch": P1, "0002-k.patch": P2})
    res = cli("fetch")
    assert res.returncode == 0, res.stderr
    assert "downloaded from file://" in res.stdout and "locked now" in res.stdout
    assert "verified fetch: 4 passed" in res.stdout
    assert "has no pinned sha256: recorded" in res.stderr
    res = cli("patch", "--builder", "debian12")
    assert res.returncode == 0, res.stderr
    assert "applied 2 patch(es)" in res.stdout and "verified patch" in res.stdout
    assert (s.work(r.name) / "src" / "VERSION").read_text() == "0.12.1-kvmlab\n"
    res = cli("patch", "--no-verify")
    assert res.returncode == 0 and "no-op: the series is already applied" in res.stdout
    assert "already in the cache" in res.stdout
    # a tree changed behind kvmlab's back is caught by the checks
    (s.work(r.name) / "src" / "VERSION").write_text("tampered\n")
    res = cli("verify", "--step", "patch")
    assert res.returncode != 0 and "patch/test_touched_files_are_as_patched" in res.stderr


def test_third_patch_failing_via_cli(tmp_path, monkeypatch, kvmlab_env, cli):
    s, r = fake_project(tmp_path, monkeypatch, patches={"1.patch": P1, "2.patch": P2})
    assert cli("patch", "--no-verify").returncode == 0
    src = s.work(r.name) / "src"
    before = tree_hashes(src)
    (s.patches_dir / r.name / "3.patch").write_text(P3_BAD)
    with open(s.patches_dir / r.name / "series", "a") as f:
        f.write("3.patch\n")
    line = one_error(cli("patch", "--no-verify"))
    assert "patch 3.patch does not apply: VERSION: hunk #1 FAILED at line 1" in line
    assert tree_hashes(src) == before  # still the tree with 1 and 2 applied
    # the checks see exactly that: the tree is as recorded, but not the current series
    res = cli("verify", "--step", "patch")
    assert "1 check(s) failed: patch/test_series_is_the_builders_current_one" in res.stderr


def test_dry_run_touches_nothing(tmp_path, monkeypatch, kvmlab_env, cli):
    s, r = fake_project(tmp_path, monkeypatch, patches={"1.patch": P1})
    res = cli("patch", "--dry-run")
    assert res.returncode == 0 and "dry run: all 1 patch(es) apply" in res.stdout
    assert not (s.work(r.name) / "src").exists()


def test_source_dir_and_tarball_via_cli(tmp_path, monkeypatch, kvmlab_env, cli):
    s, r = fake_project(tmp_path, monkeypatch, urls=["http://127.0.0.1:9/unreachable.tar.gz"],
                        patches={"1.patch": P1})
    tree = write_fake_qemu_tree(tmp_path / "checkout")
    res = cli("patch", "--source", str(tree))
    assert res.returncode == 0, res.stderr
    assert "(directory, used as is)" in res.stdout and "verified patch" in res.stdout
    tarball = make_fake_qemu_tarball(tmp_path / "elsewhere")
    res = cli("fetch", "--source", str(tarball))
    assert res.returncode == 0, res.stderr
    assert f"taken from {tarball}" in res.stdout and "verified fetch" in res.stdout


def test_offline_with_empty_cache(tmp_path, monkeypatch, kvmlab_env, cli):
    fake_project(tmp_path, monkeypatch)
    assert "offline: " in one_error(cli("fetch", "--offline"))


def test_slow_mirror_times_out_via_cli(tmp_path, monkeypatch, kvmlab_env, cli):
    tarball = make_fake_qemu_tarball(tmp_path / "dist")
    monkeypatch.setenv("KVMLAB_FETCH_RETRIES", "0")
    with LoopbackServer({tarball.name: tarball.read_bytes()}) as srv:
        fake_project(tmp_path, monkeypatch, tarball=tarball, urls=[srv.url("slow", tarball.name)])
        line = one_error(cli("fetch", "--timeout", "0.5"))
    assert f"{srv.url('slow', tarball.name)}: timed out: no data for 0.5s" in line


@pytest.mark.parametrize("breakage,needle", [
    (lambda t: t.replace('version = "0.12.1.2"', 'version = "0.12.1.2'), "TOML syntax error"),
    (lambda t: t.replace('version = "0.12.1.2"\n', ''), "missing key 'version'"),
    (None, "unknown recipe 'nosuch'"),
])
def test_recipe_errors_are_one_line(tmp_path, monkeypatch, kvmlab_env, cli, breakage, needle):
    s, r = fake_project(tmp_path, monkeypatch)
    # a home of its own: KVMLAB_HOME alone decides where recipes/ and patches/ are
    monkeypatch.setenv("KVMLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KVMLAB_RECIPES_DIR")
    monkeypatch.delenv("KVMLAB_PATCHES_DIR")
    if breakage:
        r.path.write_text(breakage(r.path.read_text()))
    for task in ("fetch", "patch"):
        res = cli(task, "--recipe", r.name if breakage else "nosuch")
        assert needle in one_error(res)
