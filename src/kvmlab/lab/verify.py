"""Run the testinfra checks of a step (kvmlab/checks/test_<check>.py) against one or more hosts.

Which check file verifies which step is kvmlab.lab.steps' registry (doctor -> host, ...).

The checks are ordinary testinfra tests (``def test_x(host)``); they run in this process through
pytest with ``--hosts`` (``local://``, ``docker://NAME``, ``ssh://user@host``, or an inventory:
``FILE`` / ``FILE:PATTERN``, kvmlab.lab.inventory, each host reported with its groups). The
controller's settings and the recipe/builder under test reach the checks through KVMLAB_*
environment variables that kvmlab/checks/conftest.py reads.

Host keys (kvmlab.lab.hostkeys) of ``ssh://``, ``safe-ssh://`` and ``paramiko://`` hosts are
checked before any check runs (refused unknown unless ``accept_new``, refused changed), and
OpenSSH then runs with ``StrictHostKeyChecking yes`` over the same known_hosts files (an ssh_config
kvmlab writes for the run; it includes ~/.ssh/config after kvmlab's lines). A host given with its
own ``?ssh_config=FILE`` is left to that file (ssh checks keys as it says: the nested lab VM's
pins the key the VM printed on its console).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import urllib.parse
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core import proc, ui
from kvmlab.core.errors import LabError, VerifyError
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings
from kvmlab.lab import hostkeys
from kvmlab.lab import steps as lab_steps
from kvmlab.lab.hostkeys import HostKeyError, KnownHosts
from kvmlab.lab.inventory import HostSpec, load_hosts, split_value


@dataclass
class CheckResult:
    host: str
    step: str
    name: str
    status: str  # passed / failed / skipped / error
    message: str = ""
    groups: list[str] = field(default_factory=list)   # the host's inventory groups


@dataclass
class VerifyReport:
    results: list[CheckResult] = field(default_factory=list)
    hosts: list[dict[str, Any]] = field(default_factory=list)   # every host, as resolved

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.status in ("passed", "skipped") for r in self.results)

    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status not in ("passed", "skipped")]

    def counts(self) -> dict[str, Any]:
        """Passed, failed (errors included) and skipped checks counted apart, the skip reasons,
        and the one-line summary: ``5 passed, 2 skipped (no boot-test record to check; ...)``."""
        by = {"passed": 0, "failed": 0, "skipped": 0}
        reasons: list[str] = []
        for r in self.results:
            kind = r.status if r.status in ("passed", "skipped") else "failed"
            by[kind] += 1
            if kind == "skipped":
                reasons.append(r.message.removeprefix("Skipped: ").strip() or r.name)
        reasons = list(dict.fromkeys(reasons))
        parts = [f"{by['passed']} passed"] + [f"{by[k]} {k}" for k in ("failed", "skipped")
                                              if by[k]]
        summary = ", ".join(parts)
        if reasons:
            summary += " (" + "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "") + ")"
        return {**by, "skipped_reasons": reasons, "summary": summary}

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


SSH_SCHEMES = ("ssh", "safe-ssh", "paramiko")


@dataclass
class Targets:
    """The testinfra hosts of a run, the ssh_config kvmlab writes for them, what to report."""
    specs: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)      # pytest id -> groups
    hosts: list[dict[str, Any]] = field(default_factory=list)
    keys: list[tuple[str, str, int]] = field(default_factory=list)  # (label, address, port)
    key_spec: list[int] = field(default_factory=list)   # keys[i] belongs to specs[key_spec[i]]
    config: list[str] = field(default_factory=list)                 # Host blocks
    unreachable: list[CheckResult] = field(default_factory=list)    # no ssh handshake: no checks


def _quote(p: str | Path) -> str:
    return '"' + str(p).replace('"', '') + '"'


def _add_spec(t: Targets, spec: str, cfg: Path) -> None:
    check_host_spec(spec)
    url = urllib.parse.urlsplit(spec)
    query = urllib.parse.parse_qs(url.query)
    t.hosts.append({"host": spec, "groups": []})
    if url.scheme in SSH_SCHEMES and "ssh_config" not in query:
        try:
            port = url.port or 22
        except ValueError:
            raise VerifyError(f"host {spec!r}: not a port number", hint="ssh://user@host:PORT")
        t.keys.append(("", url.hostname or "", port))
        t.key_spec.append(len(t.specs))
        if url.scheme != "paramiko":   # paramiko:// checks no keys itself: the pre-check does
            q = urllib.parse.urlencode({"controlpersist": "0",
                                        **{k: v[0] for k, v in query.items()},
                                        "ssh_config": str(cfg)})
            spec = urllib.parse.urlunsplit(url._replace(query=q))
    t.specs.append(spec)


def _add_inventory_host(t: Targets, h: HostSpec, cfg: Path) -> None:
    if h.connection == "local":
        spec = pid = "local://"
    elif h.connection == "docker":
        spec = pid = f"docker://{h.address}"
    else:
        alias = h.name or f"{h.address}-{h.port}"
        t.config += [f"Host {alias}", f"  HostName {h.address}", f"  Port {h.port}",
                     f"  User {h.user}"]
        if h.key:
            t.config += [f"  IdentityFile {_quote(h.key)}", "  IdentitiesOnly yes"]
        t.keys.append((h.name, h.address, h.port))
        t.key_spec.append(len(t.specs))
        spec, pid = f"ssh://{alias}?ssh_config={cfg}&controlpersist=0", f"ssh://{alias}"
    t.specs.append(spec)
    t.groups[pid] = list(h.groups)
    t.hosts.append({"host": pid, "name": h.name, "address": h.address, "port": h.port,
                    "user": h.user, "connection": h.connection, "groups": list(h.groups)})


def _multiplexing(cfg: Path) -> list[str]:
    """One ssh connection per host for the whole run (a check runs dozens of commands; a new
    login each costs ~0.2 s), its master ended by ``end_masters`` (socket beside ``cfg``)."""
    path = cfg.parent / "cm-%C"
    if len(str(path)) + 40 > 100:      # %C is 40 characters; a unix socket path has ~108
        return []
    return ["  ControlMaster auto", f"  ControlPath {_quote(path)}", "  ControlPersist 120"]


def end_masters(cfg: Path) -> None:
    """Stop the ssh connection masters of this run (``ssh -O exit``)."""
    for sock in cfg.parent.glob("cm-*"):
        proc.run(["ssh", "-S", str(sock), "-O", "exit", "kvmlab-verify"], timeout=30)


def _check_keys(t: Targets, kh: KnownHosts, accept_new: bool) -> None:
    """Every ssh host's key (HostKeyError: refused); a host without an ssh handshake is left
    out of the checks and reported as one ``reachable`` result instead of an error per check."""
    def one(k: tuple[str, str, int]) -> LabError | None:
        try:
            hostkeys.check_host(kh, *k, accept_new=accept_new)
        except (HostKeyError, hostkeys.HostUnreachable) as e:
            return e
        return None
    with ThreadPoolExecutor(max_workers=min(16, len(t.keys))) as pool:
        found = list(pool.map(one, t.keys))
    refused = [e for e in found if isinstance(e, HostKeyError)]
    if refused:
        more = f" (and {len(refused) - 1} more host(s))" if len(refused) > 1 else ""
        raise type(refused[0])(refused[0].message + more, hint=refused[0].hint)
    gone = {t.key_spec[i] for i, e in enumerate(found) if e is not None}
    for i, e in enumerate(found):
        if e is not None:
            host = t.hosts[t.key_spec[i]]["host"]
            t.unreachable.append(CheckResult(host=host, step="ssh", name="reachable",
                                             status="error", message=e.message))
    t.specs = [spec for i, spec in enumerate(t.specs) if i not in gone]


def resolve_hosts(settings: Settings, items: list[str], cfg: Path,
                  accept_new: bool = False) -> Targets:
    """testinfra specs for ``--hosts`` items (specs or inventories); every ssh host's key is
    checked (HostKeyError before any check runs) and ``cfg`` written for OpenSSH."""
    t = Targets()
    for item in items:
        if "://" in item:
            _add_spec(t, item, cfg)
            continue
        if not split_value(item)[0].exists():
            raise VerifyError(f"host {item!r} has no scheme and is no inventory file",
                              hint="write local://, docker://NAME or ssh://user@host, or give "
                                   "an inventory: FILE or FILE:GROUP")
        try:
            inv = load_hosts(item)
        except LabError as e:
            raise VerifyError(e.message, hint=e.hint) from None
        for h in inv:
            _add_inventory_host(t, h, cfg)
    kh = KnownHosts.of(settings)
    if t.keys:
        _check_keys(t, kh, accept_new)
    user_cfg = Path.home() / ".ssh" / "config"
    lines = [*t.config, "Host *", *(f"  {o}" for o in hostkeys.openssh_options(kh)),
             "  BatchMode yes", "  LogLevel ERROR", *_multiplexing(cfg)]
    if user_cfg.is_file():
        lines.append(f"  Include {_quote(user_cfg)}")
    cfg.write_text("\n".join(lines) + "\n")
    return t


def run_checks(settings: Settings, steps: list[str], hosts: list[str] | None = None,
               extra_env: dict[str, str] | None = None,
               accept_new: bool = False) -> VerifyReport:
    """Run the checks of the named steps against hosts; never raises on failed checks.

    A step is named as a task (``doctor``, ``boot-test``: the registry says which checks verify
    it) or by its check file (``host``, ``boot``, ``kmod``). A host is a testinfra spec or an
    inventory (FILE, FILE:PATTERN); ssh hosts' keys are checked first (HostKeyError)."""
    known = available_steps(settings)
    steps = list(dict.fromkeys(lab_steps.check_of(s) for s in steps))
    for s in steps:
        if s not in known:
            raise VerifyError(f"no checks for step {s!r}",
                              hint="steps with checks: " + ", ".join(known))
    env = {
        **settings.env(),
        # only testinfra's plugin: auto-loading every installed plugin costs ~0.7 s per run
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        **(extra_env or {}),
    }
    infra = settings.checks_dir
    report = VerifyReport()
    with tempfile.TemporaryDirectory(prefix="kvmlab-verify-") as tmp:
        targets = resolve_hosts(settings, hosts or ["local://"], Path(tmp) / "ssh_config",
                                accept_new)
        report.hosts = targets.hosts
        report.results.extend(targets.unreachable)
        if targets.specs:        # hosts without an ssh handshake are left out
            xml = Path(tmp) / "report.xml"
            args = [*(str(infra / f"test_{step}.py") for step in steps),
                    "--hosts=" + ",".join(targets.specs), "-q", "-p", "testinfra.plugin",
                    "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                    "--import-mode=importlib", f"--junitxml={xml}",
                    "-o", "addopts=", "-o", "norecursedirs=", "--no-header",
                    "--rootdir", str(infra), "-c", str(infra / "pytest.ini")]
            try:
                _run_pytest(args, env)
            finally:
                end_masters(Path(tmp) / "ssh_config")
            if xml.exists():
                report.results.extend(_parse_junit(xml))
            else:
                report.results.append(CheckResult("?", ",".join(steps), "collection", "error",
                                                  "pytest produced no report"))
    for r in report.results:
        r.groups = targets.groups.get(r.host, [])
    return report


def print_report(report: VerifyReport) -> None:
    hosts = sorted({r.host for r in report.results})
    for h in hosts:
        rows = [(r.step, r.name, r.status, r.message) for r in report.results if r.host == h]
        groups = next((r.groups for r in report.results if r.host == h and r.groups), [])
        title = f"checks on {h}" + (f" (groups: {', '.join(groups)})" if groups else "")
        ui.table(title, ["step", "check", "status", "detail"], rows)
