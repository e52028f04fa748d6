"""Settings resolution: flag > KVMLAB_* environment > invoke config (kvmlab: section) > default."""
from invoke import Config, Context

from kvmlab.tasks._common import settings


def ctx_with(tmp_path, text):
    (tmp_path / "invoke.yaml").write_text(text)
    c = Config(project_location=str(tmp_path))
    c.load_project()
    return Context(config=c)


def test_order_of_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("KVMLAB_BUILDER", raising=False)
    ctx = ctx_with(tmp_path, "kvmlab:\n  builder: native\n  recipe: qemu-kvm-0.12.1.2-el6\n")
    assert settings(ctx).builder == "native"
    assert settings(ctx).recipe == "qemu-kvm-0.12.1.2-el6"
    monkeypatch.setenv("KVMLAB_BUILDER", "centos6")
    assert settings(ctx).builder == "centos6"
    assert settings(ctx, builder="debian12").builder == "debian12"


def test_defaults_and_derived_paths(tmp_path, monkeypatch):
    for k in ("KVMLAB_BUILDER", "KVMLAB_RECIPE", "KVMLAB_STATE_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(tmp_path / "st"))
    s = settings(ctx_with(tmp_path, "{}\n"))
    assert (s.builder, s.recipe) == ("debian12", "qemu-kvm-0.12.1.2")
    assert s.out("r", "b") == tmp_path / "st" / "out" / "r" / "b"
    assert s.work("r") == tmp_path / "st" / "work" / "r"
    assert (s.checks_dir / "test_fetch.py").is_file()
