"""lab and repro-check tasks."""
from __future__ import annotations

from typing import Any

from invoke import Context

from kvmlab.core import ui
from kvmlab.core.errors import LabError
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings
from kvmlab.lab import remote, runlog, steps
from kvmlab.lab import runner as lab_mod
from kvmlab.lab import verify as verify_mod
from kvmlab.report import page, plots

from ._common import settings, task


@task(help={
    "recipe": "recipe to build (default: the configured recipe)",
    "builder": "debian12, centos6 or native",
    "accel": "boot-test accelerator: auto (KVM if it really works, else TCG), kvm, tcg",
    "hosts": "run the host-side steps on these ssh hosts",
    "accept_new_host_keys": "--hosts: record the keys of hosts not yet in a known_hosts file "
                            "(ssh's accept-new) instead of refusing them; a changed key is "
                            "always refused",
    "prefix": "install prefix (default: the recipe's, /usr/local)",
    "destdir": "staging root for install (DESTDIR)",
    "source": "local tarball or directory instead of downloading",
    "offline": "use only the download cache",
    "jobs": "parallel make jobs",
    "guest": "boot-test guest: tiny, linux or iso",
    "qemu": "boot-test with this qemu binary instead of the installed one",
    "skip": "comma-separated steps to skip",
    "resume": "continue from the step that failed last time",
    "check": "compare this host with lab.lock.json instead of running the pipeline",
    "force": "redo the cached host-side steps (doctor, boot-test)",
    "timeout": "boot-test timeout in seconds",
    "install_deps": "let install apt-get the runtime libraries the build needs and the host lacks",
    "no_verify": "skip the testinfra checks at the end",
    "nested": "last step: the nested KVM lab (invoke nested) with this recipe's build",
    "nested_cpu": "--nested: the lab VM's -cpu model",
    "report": "write the HTML lab report at the end, also when the lab fails (invoke report)",
})
def lab(ctx: Context, recipe: str = "", builder: str = "", accel: str = "auto", hosts: str = "",
        prefix: str = "", destdir: str = "", source: str = "", offline: bool = False,
        jobs: int = 2, guest: str = "tiny", qemu: str = "", skip: str = "",
        resume: bool = False, check: bool = False, force: bool = False, timeout: float = 0,
        install_deps: bool = False, no_verify: bool = False, nested: bool = False,
        nested_cpu: str = "max", report: bool = False, accept_new_host_keys: bool = False,
        json_: bool = False) -> None:
    """The whole pipeline (fetch ... boot-test), recorded in lab.lock.json; --check compares."""
    s = settings(ctx, recipe=recipe, builder=builder)
    if report:
        if check or hosts:
            raise LabError("--report goes with a lab run on this host, not with "
                           f"--{'check' if check else 'hosts'}",
                           hint="leave out --report; `invoke report` draws the last local run")
        plots.require()    # before the run: the report's plotting library is there
    if check:
        _check(s, json_)
        return
    opts = lab_mod.LabOptions(
        recipe=s.recipe, builder=s.builder, accel=accel, prefix=prefix or None,
        destdir=destdir or None, source=source or None, offline=offline, jobs=jobs, guest=guest,
        qemu=qemu or None, force=force, skip=tuple(x for x in skip.split(",") if x),
        timeout=timeout or None, install_deps=install_deps, nested=nested,
        nested_cpu=nested_cpu)
    if hosts:
        per_host = remote.run_hosts(s, opts, hosts, accept_new=accept_new_host_keys)
        if json_:
            ui.emit_json({"hosts": [to_jsonable(h) for h in per_host]})
        return
    with ui.console.status("lab") as status:
        res = lab_mod.run_lab(s, opts, resume=resume,
                              on_step=lambda st: status.update(f"lab: {st} ..."))
    lab_mod.print_summary(res)
    doc = res.to_dict()
    if res.error and res.failed:
        _report(s, report, doc)
        raise LabError(f"lab stopped at {res.failed.step}: {res.error.message}",
                       hint=(res.error.hint + "; " if res.error.hint else "") +
                       "fix it, then `invoke lab --resume` continues from there").with_report(doc)
    ui.info(f"lock written: {res.lock_path}")
    if not no_verify:
        _verify(s, res, doc, report)
    _report(s, report, doc)
    if json_:
        ui.emit_json(doc)


def _check(s: Settings, json_: bool) -> None:
    """lab --check: this host against lab.lock.json."""
    diffs = lab_mod.check(s)
    doc = {"lock": str(lab_mod.lock_path(s)), "matches": not diffs,
           "differences": [{"what": d.key, "locked": d.locked, "now": d.now} for d in diffs]}
    if diffs:
        ui.table("differences from lab.lock.json", ["what", "locked", "now", "status"],
                 [(d.key, d.locked[:70], d.now[:70], "fail") for d in diffs])
        raise LabError(f"{len(diffs)} difference(s) from {lab_mod.lock_path(s)}: " +
                       ", ".join(d.key for d in diffs[:4]),
                       hint="re-run `invoke lab` to bring this host back to the lock"
                       ).with_report(doc)
    ui.info(f"[green]matches[/green] {lab_mod.lock_path(s)}")
    if json_:
        ui.emit_json(doc)


def _verify(s: Settings, res: lab_mod.LabResult, doc: dict[str, Any], report: bool) -> None:
    """The checks of every step of the run, recorded in the run's log for the report."""
    checks = [c for c in steps.checks_of_run() if c in verify_mod.available_steps(s)]
    checked = verify_mod.run_checks(s, checks, ["local://"], extra_env=lab_mod.verify_env(res))
    verify_mod.print_report(checked)
    results = checked.to_dict()["results"]
    doc["checks"] = results
    counts = checked.counts()
    doc["verify"] = counts
    ui.info(f"checks: {counts['summary']}")
    runlog.add_checks(s, results)     # for `invoke report`
    if not checked.ok:
        _report(s, report, doc)
        raise LabError("lab finished but its checks failed: " +
                       ", ".join(f"{r.step}/{r.name}" for r in checked.failed()[:5])
                       ).with_report(doc)


def _report(s: Settings, enabled: bool, doc: dict[str, Any]) -> None:
    """lab --report: the HTML report of the run that just ended (its path also in the JSON)."""
    if not enabled:
        return
    path, _rep = page.write_report(s)
    doc["report"] = str(path)
    ui.info(f"report written: {path}")


@task(help={"recipe": "recipe to build", "builder": "builder", "source": "local source",
            "jobs": "parallel make jobs"})
def repro_check(ctx: Context, recipe: str = "", builder: str = "", source: str = "",
                jobs: int = 2, json_: bool = False) -> None:
    """Build twice from scratch in different directories and compare the artifacts bit for bit."""
    s = settings(ctx, recipe=recipe, builder=builder)
    res = lab_mod.repro_check(s, s.recipe, s.builder, source=source or None, jobs=jobs)
    ui.table("repro-check", ["artifact", "first", "second", "status"],
             [(p, a[:16], b[:16], "ok" if a == b else "fail") for p, a, b in res])
    bad = [p for p, a, b in res if a != b]
    doc = {"recipe": s.recipe, "builder": s.builder, "matches": not bad, "differ": bad,
           "artifacts": [{"path": p, "first": a, "second": b, "same": a == b}
                         for p, a, b in res]}
    if bad:
        raise LabError(f"{len(bad)} artifact(s) differ between two builds: {', '.join(bad)}",
                       hint="something variable is embedded (timestamps, paths); see the table"
                       ).with_report(doc)
    ui.info(f"[green]reproducible[/green]: {len(res)} artifact(s) bit-identical")
    if json_:
        ui.emit_json(doc)
