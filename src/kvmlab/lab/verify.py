"""Run the testinfra checks of a step (kvmlab/checks/test_<check>.py) against one or more hosts.

Which check file verifies which step is kvmlab.lab.steps' registry (doctor -> host, ...).

The checks are ordinary testinfra tests (``def test_x(host)``); they run in this process through
pytest with ``--hosts`` (``local://``, ``docker://NAME``, ``ssh://user@host``). The controller's
settings and the recipe/builder under test reach the checks through KVMLAB_* environment variables
that kvmlab/checks/conftest.py reads.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core import proc, ui
from kvmlab.core.errors import VerifyError
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings
from kvmlab.lab import steps as lab_steps


@dataclass
class CheckResult:
    host: str
    step: str
    name: str
    status: str  # passed / failed / skipped / error
    message: str = ""


@dataclass
class VerifyReport:
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.status in ("passed", "skipped") for r in self.results)

    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status not in ("passed", "skipped")]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


def available_steps(settings: Settings) -> list[str]:
    """The check files there are (test_<name>.py), by name."""
    d = settings.checks_dir
    return sorted(p.stem[len("test_"):] for p in d.glob("test_*.py"))


def _parse_junit(path: Path) -> list[CheckResult]:
    out: list[CheckResult] = []
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        # classname is the module (test_<step>), possibly with a class after a dot
        module = case.get("classname", "").split(".")[-1] or "?"
        step = module[len("test_"):] if module.startswith("test_") else module
        host = "?"
        if "[" in name and name.endswith("]"):
            base, param = name[:-1].split("[", 1)
            name, host = base, param
        status, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                lines = (el.get("message") or el.text or "").strip().splitlines()
                msg = lines[0][:200] if lines else ""
                break
        out.append(CheckResult(host=host, step=step, name=name, status=status, message=msg))
    return out


_ran_in_process = False


def _run_pytest(args: list[str], env: dict[str, str]) -> None:
    """pytest in this process (fast) the first time; in a child process when pytest already ran
    here or when called from inside a pytest run (module names of test files would clash)."""
    global _ran_in_process
    if _ran_in_process or os.environ.get("PYTEST_CURRENT_TEST"):
        child_env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        child_env.update(env)
        proc.run([sys.executable, "-m", "pytest", *args], timeout=1800, env=child_env,
                 capture=False, stdout=proc.DEVNULL, stderr=proc.DEVNULL, what="the checks")
        return
    import pytest  # imported lazily: only verify needs it
    _ran_in_process = True
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            pytest.main(args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# testinfra's connection backends (testinfra.backend.BACKENDS)
HOST_SCHEMES = ("local", "paramiko", "ssh", "safe-ssh", "docker", "podman", "kubectl",
                "openshift", "winrm", "lxc", "ansible", "salt")


def check_host_spec(spec: str) -> None:
    """SCHEME://[user@]host with a scheme testinfra knows; else one clear VerifyError."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        raise VerifyError(f"host {spec!r} has no scheme",
                          hint="write it as local://, docker://NAME or ssh://user@host")
    if scheme not in HOST_SCHEMES:
        raise VerifyError(f"host {spec!r}: unknown scheme {scheme!r}",
                          hint="testinfra knows " + ", ".join(f"{x}://" for x in HOST_SCHEMES))
    if scheme != "local" and not rest.split("?")[0].strip("/"):
        raise VerifyError(f"host {spec!r} names no host", hint=f"e.g. {scheme}://NAME")


def run_checks(settings: Settings, steps: list[str], hosts: list[str] | None = None,
               extra_env: dict[str, str] | None = None) -> VerifyReport:
    """Run the checks of the named steps against hosts; never raises on failed checks.

    A step is named as a task (``doctor``, ``boot-test``: the registry says which checks verify
    it) or by its check file (``host``, ``boot``, ``kmod``)."""
    known = available_steps(settings)
    steps = list(dict.fromkeys(lab_steps.check_of(s) for s in steps))
    for s in steps:
        if s not in known:
            raise VerifyError(f"no checks for step {s!r}",
                              hint="steps with checks: " + ", ".join(known))
    hosts = hosts or ["local://"]
    for h in hosts:
        check_host_spec(h)
    env = {
        **settings.env(),
        # only testinfra's plugin: auto-loading every installed plugin costs ~0.7 s per run
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        **(extra_env or {}),
    }
    infra = settings.checks_dir
    report = VerifyReport()
    with tempfile.TemporaryDirectory(prefix="kvmlab-verify-") as tmp:
        xml = Path(tmp) / "report.xml"
        args = [*(str(infra / f"test_{step}.py") for step in steps),
                "--hosts=" + ",".join(hosts), "-q", "-p", "testinfra.plugin",
                "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                "--import-mode=importlib", f"--junitxml={xml}",
                "-o", "addopts=", "-o", "norecursedirs=", "--no-header",
                "--rootdir", str(infra), "-c", str(infra / "pytest.ini")]
        _run_pytest(args, env)
        if xml.exists():
            report.results.extend(_parse_junit(xml))
        else:
            report.results.append(CheckResult("?", ",".join(steps), "collection", "error",
                                              "pytest produced no report"))
    return report


def print_report(report: VerifyReport) -> None:
    hosts = sorted({r.host for r in report.results})
    for h in hosts:
        rows = [(r.step, r.name, r.status, r.message) for r in report.results if r.host == h]
        ui.table(f"checks on {h}", ["step", "check", "status", "detail"], rows)
