"""The lab report (kvmlab.report) on a state dir of real-format records (support.reportstate):
what it gathers, that the page needs no network, that every recorded text is escaped, and the
records it relies on (the lab's run log, the build's phase marks)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlab.build import qemu as B
from kvmlab.core.errors import KvmlabError, LabError, ReportError
from kvmlab.lab import runlog, runner, steps
from kvmlab.report import gather, page, plots
from support.reportstate import BOOTS, NASTY, Q012, Q72, make_state

needs_pygal = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("pygal") is None,
    reason="pygal (the `report` extra) is not installed: python3 -m pip install '.[report]'")


def test_gathers_timeline_builds_every_boot_checks_and_doctor(kvmlab_env):
    rep = gather.gather(make_state(kvmlab_env))
    assert [b.step for b in rep.steps][:4] == ["fetch", "patch", "images", "build"]
    build = next(b for b in rep.steps if b.step == "build")
    assert build.offset == pytest.approx(1.1) and build.seconds == pytest.approx(41.9)
    phases = {b.name: b.phases for b in rep.builds}
    # a build recorded now: configure and make instead of their sum; an older one: the sum
    assert phases["qemu-kvm-0.12.1.2/debian12"] == {"copy": 0.09, "configure": 1.61,
                                                    "make": 39.43, "deps": 0.39, "collect": 0.02}
    assert phases["qemu-kvm-0.12.1.2/centos6"] == {"copy": 0.083, "run": 38.172}
    # every run kept, plus the last boot-test whose run dir was pruned
    assert len(rep.boots) == len(BOOTS) + 1
    groups = {(g.qemu, g.accel, g.guest): g for g in rep.boot_groups()}
    tiny = groups[(Q012, "tcg", "tiny")]
    assert (tiny.runs, tiny.booted, tiny.fastest, tiny.median, tiny.slowest) == \
        (4, 4, 0.12, pytest.approx(0.13), 0.14)
    assert groups[(Q72, "kvm", "tiny")].median == 0.05
    never = groups[(Q012, "none", "tiny")]
    assert (never.runs, never.booted, never.median) == (1, 0, None)
    assert rep.doctor_facts["cpu.vendor"] == "AuthenticAMD"
    assert rep.doctor_facts["usable"] == "False"
    assert [c["name"] for c in rep.doctor_checks] == ["CPU", "virtualization extensions"]
    assert not rep.failed and not rep.problems


def test_a_skipped_check_is_not_counted_as_passed(kvmlab_env):
    rep = gather.gather(make_state(kvmlab_env, failed_check=True))
    assert rep.check_counts() == {"passed": 2, "failed": 1, "error": 0, "skipped": 1}
    html = page.render(rep) if _has_pygal() else ""
    if html:
        assert "2</b> passed" in html and "1</b> skipped" in html
        assert "check(s) failed" in html


def test_empty_state_is_one_clear_error_naming_invoke_lab(kvmlab_env):
    (kvmlab_env.out_dir / "x" / "y").mkdir(parents=True)   # a build alone is not a lab
    with pytest.raises(LabError) as e:
        gather.gather(kvmlab_env)
    assert "nothing to report" in e.value.message and str(kvmlab_env.state_dir) in e.value.message
    assert "invoke lab" in (e.value.hint or "")


def test_damaged_records_are_listed_not_fatal(kvmlab_env):
    make_state(kvmlab_env)
    bad = next(vm_dir for vm_dir in sorted((kvmlab_env.state_dir / "vm" / "runs").iterdir()))
    (bad / "result.json").write_text("{not json")
    (kvmlab_env.out("broken", "debian12") / "manifest.json").parent.mkdir(parents=True)
    (kvmlab_env.out("broken", "debian12") / "manifest.json").write_text("[]")
    rep = gather.gather(kvmlab_env)
    assert any("result.json" in p for p in rep.problems)
    assert any("broken/debian12" in p for p in rep.problems)
    assert len(rep.boots) == len(BOOTS)            # the damaged one left out, the rest read


def _has_pygal() -> bool:
    return __import__("importlib.util").util.find_spec("pygal") is not None


# references that would make the browser fetch something: src/href/xlink:href to a URL,
# CSS @import or url() of anything but a fragment or data:
EXTERNAL = [re.compile(r"""\b(?:src|href|xlink:href|action|poster)\s*=\s*["']?\s*(?!#)[a-z]+:""",
                       re.I),
            re.compile(r"""\b(?:src|href|xlink:href)\s*=\s*["']?\s*//""", re.I),
            re.compile(r"@import", re.I),
            re.compile(r"""url\(\s*["']?(?!#|data:)""", re.I)]


def bar_widths(svg: str) -> list[float]:
    """The widths of pygal's data-point bars (a stacked chart draws a missing value as 0)."""
    return [float(w) for w in re.findall(
        r'<rect[^>]*width="([\d.]+)"[^>]*class="rect reactive tooltip-trigger"', svg)]


@needs_pygal
def test_page_is_self_contained(kvmlab_env, tmp_path):
    path, rep = page.write_report(make_state(kvmlab_env), tmp_path / "r.html")
    html = path.read_text()
    for pat in EXTERNAL:
        assert not pat.search(html), f"external reference: {pat.search(html)}"
    assert "<script" not in html and "<link" not in html and "<img" not in html
    for sid in ("summary", "timeline", "builds", "boots", "checks", "doctor"):
        assert f'<section id="{sid}">' in html
    svgs = re.findall(r"<svg\b.*?</svg>", html, re.S)
    assert len(svgs) == 3
    assert all('class="pygal-chart"' in s for s in svgs)
    # the data points are there: a bar per step that took time, per build phase recorded (5 of
    # the new build, 2 of the old one), per qemu x accel x guest with a median
    bars = [bar_widths(s) for s in svgs]
    timed = [b for b in rep.steps if b.seconds > 0]
    assert len([w for w in bars[0] if w > 0]) >= len(timed)
    assert len([w for w in bars[1] if w > 0]) == 5 + 2
    assert len(bars[2]) == sum(g.median is not None for g in rep.boot_groups()) == 5
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not list(tmp_path.glob(".r.html.*")), "a temp file was left"


@needs_pygal
def test_every_recorded_text_is_escaped(kvmlab_env, tmp_path):
    s = make_state(kvmlab_env, nasty=True, failed_check=True)
    html = page.render(gather.gather(s))
    assert NASTY not in html and "<script" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&lt;b&gt;" in html
    assert "test_serial_log_has_marker[&lt;&amp;&gt;]" in html
    # in the plots too (pygal writes its labels through an XML serializer)
    for svg in re.findall(r"<svg\b.*?</svg>", html, re.S):
        assert "<b>" not in svg


@needs_pygal
def test_a_failed_lab_shows_where_and_why(kvmlab_env):
    html = page.render(gather.gather(make_state(kvmlab_env, fail=True, nasty=True)))
    assert "lab FAILED at step build" in html
    assert "build of &lt;script&gt;" in html and "hint: full log: build-debian12.log" in html
    assert "no checks recorded for this run" in html


def test_missing_plotting_library_is_one_error_with_the_pip_hint(kvmlab_env, monkeypatch):
    make_state(kvmlab_env)
    monkeypatch.setitem(sys.modules, "pygal", None)       # import pygal -> ImportError
    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ReportError) as e:
        page.write_report(kvmlab_env)
    assert "pygal" in e.value.message and "kvmlab[report]" in (e.value.hint or "")
    with pytest.raises(ReportError):
        plots.timeline([])
    assert not page.default_path(kvmlab_env).exists()


@needs_pygal
def test_drawing_leaves_no_finder_pytest_cannot_use():
    """pygal's map-plugin finder lacks find_spec: `verify` after the import failed
    (lab --report)."""
    plots.boot_times([])
    assert all(hasattr(f, "find_spec") for f in sys.meta_path)
    r = subprocess.run([sys.executable, "-c", "import sys; from kvmlab.report import plots; "
                        "plots.timeline([]); import importlib.util; "
                        "print(all(hasattr(f, 'find_spec') for f in sys.meta_path))"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True", r.stderr


# --------------------------------------------------------------------------------------------
# the records the report reads


def test_run_log_records_the_timeline_and_the_failure(kvmlab_env, monkeypatch):
    """run_lab writes lab/run.json after every step; a failing step ends it with the error."""
    def ok(c):
        return steps.StepOutcome("fetch", "ok", figure="fetched")

    def boom(c):
        raise LabError("<bad> & broken", hint="look")
    monkeypatch.setattr(steps, "STEPS", (steps.Step("fetch", ok), steps.Step("patch", boom)))
    res = runner.run_lab(kvmlab_env, steps.LabOptions(recipe="qemu-kvm-0.12.1.2",
                                                      builder="debian12"))
    assert res.failed is not None
    doc = runlog.read(kvmlab_env)
    assert doc is not None
    assert [(x["step"], x["status"]) for x in doc["steps"]] == [("fetch", "ok"),
                                                                ("patch", "failed")]
    assert doc["steps"][1]["started"] >= doc["steps"][0]["started"] >= doc["started"]
    assert doc["failed"] == "patch" and doc["error"] == {"message": "<bad> & broken",
                                                         "hint": "look"}
    assert doc["finished"] >= doc["started"]
    runlog.add_checks(kvmlab_env, [{"host": "local", "step": "fetch", "name": "t",
                                    "status": "skipped", "message": ""}])
    assert runlog.read(kvmlab_env)["checks"][0]["status"] == "skipped"


def test_unreadable_run_log_reads_as_no_run(kvmlab_env):
    p = runlog.path(kvmlab_env)
    p.parent.mkdir(parents=True)
    for text in ("{", json.dumps({"schema": 99, "steps": []}), json.dumps([])):
        p.write_text(text)
        assert runlog.read(kvmlab_env) is None


def test_builder_script_records_configure_and_make_phases(tmp_path):
    (tmp_path / "configure").write_text("#!/bin/sh\nsleep 0.2\n")
    (tmp_path / "configure").chmod(0o755)
    (tmp_path / "Makefile").write_text("all:\n\t@sleep 0.3\n")
    r = subprocess.run(["/bin/sh", "-c", B._script(["./configure"], ["make"])], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = B.read_phases(tmp_path)
    assert set(got) == {"configure", "make"}
    assert got["configure"] >= 0.2 and got["make"] >= 0.3


def test_read_phases_of_an_older_or_broken_tree(tmp_path):
    assert B.read_phases(tmp_path) == {}
    (tmp_path / B.PHASES_FILE).write_text("configure 100.5\nmake 103\n")   # make never ended
    assert B.read_phases(tmp_path) == {"configure": 2.5}
    (tmp_path / B.PHASES_FILE).write_text("configure 100.N\nmake 101.N\nend 109.N\n")
    assert B.read_phases(tmp_path) == {"configure": 1.0, "make": 8.0}   # date without %N


def test_native_builder_records_the_same_phases(tmp_path):
    from kvmlab.build.containers import LogSink
    sink = LogSink(tmp_path / "log", quiet=True)
    rc = B.run_native(tmp_path, [["true"], ["sleep", "0.2"]], {}, sink, 60, B.PHASES)
    sink.close()
    assert rc == 0
    got = B.read_phases(tmp_path)
    assert set(got) == {"configure", "make"} and got["make"] >= 0.2


def test_report_errors_are_kvmlab_errors():
    assert issubclass(ReportError, KvmlabError)
    assert Path(page.__file__).parent.name == "report"
