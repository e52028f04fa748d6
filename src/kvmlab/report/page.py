"""The report as one self-contained HTML file: inline style, inline SVG plots, no script.

Sections (each a ``<section id=...>``): ``summary`` (how the run ended, recipe, builder, doctor
verdict, checks), ``timeline``, ``builds``, ``boots``, ``checks``, ``doctor``, and ``problems``
when a record could not be read. Every text that comes from a record (recipe names, check ids,
error messages, paths) goes through html.escape; the SVG comes from pygal, which escapes its
labels itself. ``write`` puts the file in place atomically (temp file + rename).
"""
from __future__ import annotations

import html
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kvmlab.core.fsutil import atomic_write_bytes
from kvmlab.core.settings import Settings
from kvmlab.report import plots
from kvmlab.report.gather import PHASE_LABELS, BootRun, Report, gather

CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:0;color:#263238;background:#f5f7f8}
header{background:#263238;color:#eceff1;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#b0bec5;font-size:13px}
main{padding:8px 28px 40px;max-width:1160px}
section{background:#fff;border:1px solid #dfe4e7;border-radius:6px;margin:18px 0;
  padding:6px 18px 16px}
h2{font-size:18px;margin:12px 0 8px}
.banner{padding:10px 14px;border-radius:5px;font-weight:bold;margin:12px 0}
.banner.ok{background:#e8f5e9;color:#1b5e20}.banner.bad{background:#ffebee;color:#b71c1c}
.banner .hint{font-weight:normal;display:block;margin-top:4px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #dfe4e7;border-radius:5px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:12px;color:#607d8b;font-weight:normal}
table{border-collapse:collapse;font-size:13px;margin:8px 0;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceff1;vertical-align:top}
th{background:#eceff1}td.num{text-align:right;white-space:nowrap}
.st{font-weight:bold}.st-ok,.st-passed{color:#2e7d32}.st-failed,.st-error,.st-fail{color:#c62828}
.st-skipped,.st-no-op,.st-unknown{color:#607d8b}.st-warn{color:#ef6c00}
.none{color:#78909c;font-style:italic}
.plot svg{max-width:100%;height:auto;display:block}
details summary{cursor:pointer;color:#37474f;margin:6px 0}
code{font-size:12px}
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(epoch)))


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]], status_col: int | None = None,
           num_cols: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if i == status_col:
                cells.append(f'<td class="st st-{esc(v)}">{esc(v)}</td>')
            elif i in num_cols:
                cells.append(f'<td class="num">{esc(v)}</td>')
            else:
                cells.append(f"<td>{esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _none(text: str) -> str:
    return f'<p class="none">{esc(text)}</p>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def _banner(rep: Report) -> str:
    run, counts = rep.run, rep.check_counts()
    if run and run.get("failed"):
        err = run.get("error") or {}
        return (f'<div class="banner bad">lab FAILED at step {esc(run["failed"])}: '
                f'{esc(err.get("message"))}<span class="hint">hint: {esc(err.get("hint"))}'
                f"</span></div>")
    if counts["failed"] or counts["error"]:
        return (f'<div class="banner bad">lab finished, but {counts["failed"] + counts["error"]}'
                " check(s) failed</div>")
    if run and not run.get("finished"):
        return '<div class="banner bad">the lab run did not finish (interrupted?)</div>'
    if run is None:
        return ('<div class="banner ok">lab lock recorded (this lab predates step timelines: '
                "run <code>invoke lab</code> again for one)</div>")
    return '<div class="banner ok">lab passed</div>'


def _summary(rep: Report) -> str:
    lock, run = rep.lock or {}, rep.run or {}
    recipe = lock.get("recipe") or {"name": run.get("recipe")}
    counts = rep.check_counts()
    checks = (f"{counts['passed']} passed, {counts['failed'] + counts['error']} failed, "
              f"{counts['skipped']} skipped") if rep.checks is not None else "not run"
    boot = (lock.get("boot") or {})
    name, version = str(recipe.get("name") or "?"), str(recipe.get("version") or "")
    cards = [("recipe", name if version in name else f"{name} {version}"),
             ("builder", run.get("builder") or lock.get("builder")),
             ("host", run.get("host") or lock.get("host")),
             ("run started", _when(run.get("started"))),
             ("run time", _secs(run["finished"] - run["started"]) if run.get("finished")
              and run.get("started") else "-"),
             ("boot (lock)", f"{boot.get('guest', '-')} under {boot.get('accel', '-')}"
              if boot else "-"),
             ("doctor", rep.doctor_facts.get("verdict", "-")), ("checks", checks)]
    body = '<div class="cards">' + "".join(
        f'<div class="card"><b>{esc(k)}</b>{esc(v)}</div>' for k, v in cards) + "</div>"
    return _section("summary", "Summary", _banner(rep) + body)


def _timeline(rep: Report) -> str:
    if not rep.steps:
        return _section("timeline", "Step timeline", _none(
            "no step timeline recorded: run `invoke lab` (this kvmlab records it in "
            "<state>/lab/run.json)"))
    rows = [(b.step, b.status, _secs(b.offset), _secs(b.seconds), b.figure) for b in rep.steps]
    return _section("timeline", "Step timeline",
                    f'<div class="plot">{plots.timeline(rep.steps)}</div>' +
                    _table(["step", "status", "start", "time", "key figure"], rows, 1, (2, 3)))


def _builds(rep: Report) -> str:
    if not rep.builds:
        return _section("builds", "Build phases", _none("no build recorded in out/"))
    phases = [p for p in ("copy", "prepare", "configure", "make", "run", "deps", "collect")
              if any(p in b.phases for b in rep.builds)]
    rows = [(b.name, _secs(b.seconds), *(_secs(b.phases.get(p)) for p in phases), b.compiler,
             b.built_at) for b in rep.builds]
    note = "" if any(b.phases for b in rep.builds) else _none(
        "these manifests record no phase times (built by an older kvmlab)")
    return _section("builds", "Build phases",
                    f'<div class="plot">{plots.build_phases(rep.builds)}</div>' + note +
                    _table(["build", "total", *(PHASE_LABELS.get(p, p) for p in phases),
                            "compiler", "built at"], rows,
                           num_cols=range(1, 2 + len(phases))))


def _boot_rows(runs: list[BootRun]) -> list[tuple[str, ...]]:
    return [(_when(b.when), b.qemu, b.accel, b.guest, "booted" if b.booted else "failed",
             _secs(b.seconds), b.failure) for b in reversed(runs)]


def _boots(rep: Report) -> str:
    if not rep.boots:
        return _section("boots", "Boot times", _none("no boot-test run recorded (vm/runs/)"))
    groups = rep.boot_groups()
    rows = [(g.qemu, g.accel, g.guest, g.runs, f"{g.booted}/{g.runs}", _secs(g.fastest),
             _secs(g.median), _secs(g.slowest)) for g in groups]
    plot = f'<div class="plot">{plots.boot_times(groups)}</div>' \
        if any(g.median is not None for g in groups) else _none("no run reached its marker")
    runs = (f"<details><summary>every run ({len(rep.boots)})</summary>" +
            _table(["when", "qemu", "accel", "guest", "result", "to marker", "failure"],
                   _boot_rows(rep.boots), 4, (5,)) + "</details>")
    return _section("boots", "Boot times per qemu, accelerator and guest", plot +
                    _table(["qemu", "accel", "guest", "runs", "booted", "fastest", "median",
                            "slowest"], rows, num_cols=(3, 4, 5, 6, 7)) + runs)


def _checks(rep: Report) -> str:
    if rep.checks is None:
        return _section("checks", "Checks", _none(
            "no checks recorded for this run (lab --no-verify, or the lab stopped before them)"))
    c = rep.check_counts()
    line = (f"<p><b>{c['passed']}</b> passed, <b>{c['failed']}</b> failed, <b>{c['error']}</b> "
            f"error, <b>{c['skipped']}</b> skipped (a skipped check is not a pass)</p>")
    rows = [(r.host, r.step, r.name, r.status, r.message) for r in rep.checks]
    return _section("checks", "Checks", line + _table(["host", "step", "check", "status",
                                                       "detail"], rows, 3))


def _doctor(rep: Report) -> str:
    if not rep.doctor_facts:
        return _section("doctor", "Doctor", _none("no doctor facts recorded"))
    body = f"<p>verdict: <b>{esc(rep.doctor_facts.get('verdict'))}</b> " \
           f"<small>({esc(rep.doctor_path)})</small></p>"
    if rep.doctor_checks:
        body += _table(["check", "status", "value", "explanation"],
                       [(c.get("name"), c.get("status"), c.get("value"), c.get("explanation"))
                        for c in rep.doctor_checks], 1)
    body += _table(["fact", "value"], sorted(rep.doctor_facts.items()))
    return _section("doctor", "Doctor facts", body)


def render(rep: Report) -> str:
    lock = rep.lock or {}
    recipe = (lock.get("recipe") or {}).get("name") or (rep.run or {}).get("recipe") or "?"
    problems = "" if not rep.problems else _section(
        "problems", "Records that could not be read",
        "<ul>" + "".join(f"<li>{esc(p)}</li>" for p in rep.problems) + "</ul>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>kvmlab report: {esc(recipe)}</title>", f"<style>{CSS}</style></head><body>",
        f"<header><h1>kvmlab lab report: {esc(recipe)}</h1><p>state {esc(rep.state_dir)}"
        f" · lock {esc(rep.lock_path or 'none')} · generated {esc(_when(rep.generated))}"
        "</p></header><main>",
        _summary(rep), _timeline(rep), _builds(rep), _boots(rep), _checks(rep), _doctor(rep),
        problems, "</main></body></html>", ""])


def default_path(s: Settings) -> Path:
    return s.state_dir / "report" / "lab-report.html"


def write(rep: Report, output: Path) -> Path:
    """The page at ``output``, atomically: never a half-written file (readable by all, like
    any page one hands around)."""
    atomic_write_bytes(output, render(rep).encode("utf-8"))
    os.chmod(output, 0o644)
    return output


def write_report(s: Settings, output: Path | None = None) -> tuple[Path, Report]:
    """Gather the records of ``s``'s state dir and write the page (default_path by default)."""
    plots.require()
    rep = gather(s)
    return write(rep, output or default_path(s)), rep
