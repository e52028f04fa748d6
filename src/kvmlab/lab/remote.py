"""Many hosts: run lab's host-side steps on ssh hosts in parallel, with the build done once.

The controller runs the registry's controller steps (kvmlab.lab.steps: fetch -> patch -> images
-> build) locally, then for every host (in parallel, over ssh with Fabric): uploads a bundle
(kvmlab and the Python packages it imports, copied from this interpreter's installation, plus
recipes/) and the build output, and runs
``python3 -m kvmlab lab --skip fetch,patch,images,build`` there, which performs install ->
install-bios -> load-modules -> doctor -> create-image -> guest -> boot-test on that host and writes
its own lab.lock.json, which is copied back. A failing or unreachable host does not stop the others.

Inventory (``--hosts FILE``): one target per line (``ssh://user@host:port``, ``user@host[:port]``,
``#`` comments, optional ``key=PATH``), or TOML: ``hosts = ["ssh://..."]`` or ``[[host]]`` tables
with ``address``, ``user``, ``port``, ``key``.
"""
from __future__ import annotations

import dataclasses
import io
import re
import shlex
import tarfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invoke.exceptions import CommandTimedOut, UnexpectedExit

from kvmlab.core import ui
from kvmlab.core.bundle import make_bundle
from kvmlab.core.errors import LabError
from kvmlab.core.fsutil import atomic_write_bytes
from kvmlab.core.settings import Settings
from kvmlab.lab import runner as lab
from kvmlab.lab import steps
from kvmlab.lab.steps import LabOptions

# the steps the controller does once for every host (the registry's controller steps)
HOST_STEPS_SKIP = steps.CONTROLLER_STEPS
REMOTE_ROOT = "/var/tmp/kvmlab-remote"


@dataclass(frozen=True)
class HostSpec:
    address: str
    user: str = "root"
    port: int = 22
    key: str | None = None

    @property
    def label(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


_TARGET_RE = re.compile(r"^(?:ssh://)?(?:(?P<user>[^@\s/]+)@)?(?P<host>\[[^\]]+\]|[^:\s/]+)"
                        r"(?::(?P<port>\d+))?/?$")


def _parse_target(text: str, where: str) -> HostSpec:
    parts = text.split()
    m = _TARGET_RE.match(parts[0])
    if not m:
        raise LabError(f"{where}: not an ssh target: {parts[0]!r}",
                       hint="write ssh://user@host:port or user@host[:port]")
    key = None
    for extra in parts[1:]:
        if extra.startswith("key="):
            key = extra[4:]
        else:
            raise LabError(f"{where}: unknown field {extra!r}", hint="only key=PATH may follow")
    return HostSpec(address=m["host"].strip("[]"), user=m["user"] or "root",
                    port=int(m["port"] or 22), key=key)


def parse_inventory(path: Path) -> list[HostSpec]:
    try:
        text = path.read_text()
    except OSError as e:
        raise LabError(f"cannot read inventory {path}: {e.strerror}") from None
    hosts: list[HostSpec] = []
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise LabError(f"{path}: TOML syntax error: {e}") from None
        for i, h in enumerate(data.get("hosts", [])):
            hosts.append(_parse_target(str(h), f"{path}: hosts[{i}]"))
        for i, t in enumerate(data.get("host", [])):
            if "address" not in t:
                raise LabError(f"{path}: [[host]] #{i + 1} has no 'address'")
            hosts.append(HostSpec(address=t["address"], user=t.get("user", "root"),
                                  port=int(t.get("port", 22)), key=t.get("key")))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                hosts.append(_parse_target(line, f"{path}:{n}"))
    if not hosts:
        raise LabError(f"inventory {path} names no hosts")
    return hosts


# ---------------------------------------------------------------------------------------------
# the bundle: kvmlab.core.bundle.make_bundle (also what the nested lab VM gets)


def _out_tarball(settings: Settings, recipe: str, builder: str) -> bytes:
    out = settings.out(recipe, builder)
    if not (out / "manifest.json").exists():
        raise LabError(f"no build output at {out}", hint="the build step must succeed first")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        tar.add(out, f"state/out/{recipe}/{builder}")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class HostResult:
    host: str
    ok: bool
    seconds: float
    summary: str
    output: str = ""
    lock: Path | None = None


def remote_command(opts: LabOptions, root: str = REMOTE_ROOT) -> str:
    skip = ",".join(dict.fromkeys(HOST_STEPS_SKIP + tuple(opts.skip)))
    args = ["python3", "-m", "kvmlab", "lab", "--recipe", opts.recipe, "--builder", opts.builder,
            "--accel", opts.accel, "--guest", opts.guest, "--skip", skip, "--no-verify"]
    for flag, val in (("--prefix", opts.prefix), ("--destdir", opts.destdir),
                      ("--qemu", opts.qemu), ("--timeout", opts.timeout)):
        if val:
            args += [flag, str(val)]
    if opts.install_deps:
        args.append("--install-deps")  # each host installs the runtime libraries it lacks
    env = {"PYTHONPATH": f"{root}/lib", "KVMLAB_HOME": root, "KVMLAB_STATE_DIR": f"{root}/state",
           "KVMLAB_CACHE": f"{root}/cache", "KVMLAB_LOCK": f"{root}/state/kvmlab.lock",
           "TERM": "dumb", "COLUMNS": "200"}
    return (f"cd {root} && " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "
            + " ".join(shlex.quote(a) for a in args))


def _run_one(settings: Settings, opts: LabOptions, h: HostSpec, bundle: bytes, out_tar: bytes,
             connect_timeout: float, command_timeout: float) -> HostResult:
    from fabric import Connection
    t0 = time.monotonic()
    import paramiko
    kw: dict[str, Any] = {"banner_timeout": connect_timeout, "auth_timeout": connect_timeout}
    if h.key:
        kw["key_filename"] = h.key
    try:
        with Connection(h.address, user=h.user, port=h.port, connect_kwargs=kw,
                        connect_timeout=connect_timeout) as c:
            c.run(f"rm -rf {REMOTE_ROOT}/lib && mkdir -p {REMOTE_ROOT}", hide=True,
                  timeout=command_timeout)
            for name, data in (("bundle.tar.gz", bundle), ("out.tar.gz", out_tar)):
                c.put(io.BytesIO(data), f"{REMOTE_ROOT}/{name}")
                c.run(f"tar -xzf {REMOTE_ROOT}/{name} -C {REMOTE_ROOT}", hide=True,
                      timeout=command_timeout)
            r = c.run(remote_command(opts), hide=True, warn=True, timeout=command_timeout)
            output = (r.stdout or "") + (r.stderr or "")
            lock = None
            if r.ok:
                buf = io.BytesIO()
                c.get(f"{REMOTE_ROOT}/state/lab.lock.json", buf)
                lock = settings.state_dir / "lab" / "hosts" / f"{h.address}_{h.port}.lock.json"
                lock.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(lock, buf.getvalue())
            errs = [ln for ln in output.splitlines() if ln.startswith("error:")]
            summary = "all host-side steps passed" if r.ok else (errs[-1] if errs else
                                                                 f"exit {r.exited}")
            return HostResult(h.label, r.ok, time.monotonic() - t0, summary, output, lock)
    except (OSError, EOFError, paramiko.SSHException, CommandTimedOut, UnexpectedExit) as e:
        # unreachable, refused, auth failure, dropped connection, timeout, a setup command failed
        msg = f"{type(e).__name__}: {e}".strip()
        return HostResult(h.label, False, time.monotonic() - t0, f"unreachable or failed: {msg}")


def run_on_hosts(settings: Settings, opts: LabOptions, hosts: list[HostSpec], *,
                 connect_timeout: float = 10, command_timeout: float = 900) -> list[HostResult]:
    bundle = make_bundle(settings)
    out_tar = _out_tarball(settings, opts.recipe, opts.builder)
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        futs = [pool.submit(_run_one, settings, opts, h, bundle, out_tar, connect_timeout,
                            command_timeout) for h in hosts]
        return [f.result() for f in futs]


def run_hosts(settings: Settings, opts: LabOptions, inventory: str) -> list[HostResult]:
    """`invoke lab --hosts FILE`: local build once, then the host-side steps on every host."""
    hosts = parse_inventory(Path(inventory))
    local_skip = tuple(n for n in steps.NAMES if n not in HOST_STEPS_SKIP)
    with ui.console.status("lab: building once on the controller") as status:
        res = lab.run_lab(settings, dataclasses.replace(opts, skip=local_skip),
                          on_step=lambda st: status.update(f"lab (controller): {st} ..."))
    lab.print_summary(res)
    if res.error and res.failed:
        raise LabError(f"lab stopped at {res.failed.step}: {res.error.message}",
                       hint=res.error.hint)
    with ui.console.status(f"lab: host-side steps on {len(hosts)} host(s)"):
        results = run_on_hosts(settings, opts, hosts)
    ui.table("lab on hosts", ["host", "status", "time", "summary"],
             [(r.host, "ok" if r.ok else "failed", f"{r.seconds:.1f}s", r.summary)
              for r in results])
    bad = [r for r in results if not r.ok]
    if bad:
        raise LabError(f"{len(bad)} of {len(results)} host(s) failed: " +
                       ", ".join(r.host for r in bad),
                       hint="see the table above" + ("; the other hosts completed"
                                                     if len(bad) < len(results) else ""))
    return results
