"""settings' sources, plain tables and JSON records (the parts of `status` and `--json`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import load_settings, resolve_settings
from kvmlab.core.ui import plain_table


def test_sources_follow_the_order_and_leave_results_unchanged(monkeypatch, tmp_path):
    for k in ("KVMLAB_RECIPE", "KVMLAB_BUILDER", "KVMLAB_CACHE", "KVMLAB_LOCK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(tmp_path / "st"))
    monkeypatch.setenv("KVMLAB_BUILDER", "centos6")
    cfg = {"builder": "native", "cache": str(tmp_path / "c"), "recipe": "from-config"}
    s, src = resolve_settings({"recipe": "from-flag"}, cfg)
    assert (s.recipe, src["recipe"]) == ("from-flag", "flag")
    assert (s.builder, src["builder"]) == ("centos6", "env")       # env beats config
    assert (s.cache, src["cache"]) == (tmp_path / "c", "config")
    assert (s.state_dir, src["state_dir"]) == (tmp_path / "st", "env")
    assert src["lock"] == "default"
    assert load_settings({"recipe": "from-flag"}, cfg) == s


def test_plain_table_one_line_per_row_no_markup():
    lines = plain_table("t", ["name", "status", "detail"],
                        [("a", "[green]ok[/green]", "x" * 300), ("bb", None, "two\nlines")])
    assert lines[0] == "t" and lines[1].split() == ["name", "status", "detail"]
    assert lines[2].split() == ["a", "ok", "x" * 300]
    assert lines[3].split() == ["bb", "two", ";", "lines"]
    assert lines[2].index("ok") == lines[1].index("status")        # columns line up


def test_to_jsonable_walks_records():
    @dataclass
    class Inner:
        p: Path

        def to_dict(self):
            return {"inner": str(self.p)}

    @dataclass
    class Outer:
        path: Path
        items: tuple
        inner: Inner

    d = to_jsonable(Outer(Path("/x"), (1, Path("/y")), Inner(Path("/z"))))
    assert d == {"path": "/x", "items": [1, "/y"], "inner": {"inner": "/z"}}
