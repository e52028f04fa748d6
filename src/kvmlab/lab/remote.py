"""Many hosts: run lab's host-side steps on ssh hosts in parallel, with the build done once.

The controller runs the registry's controller steps (kvmlab.lab.steps: fetch -> patch -> images
-> build) locally, then for every host (in parallel, over ssh with Fabric): uploads a bundle
(kvmlab and the Python packages it imports, copied from this interpreter's installation, plus
recipes/) and the build output, and runs
``python3 -m kvmlab lab --skip fetch,patch,images,build`` there, which performs install ->
install-bios -> load-modules -> doctor -> create-image -> guest -> boot-test on that host and writes
its own lab.lock.json, which is copied back. A failing or unreachable host does not stop the others.

Inventory (``--hosts FILE`` or ``FILE:PATTERN``): kvmlab's host list or TOML, or an Ansible
inventory (kvmlab.lab.inventory). Host keys (kvmlab.lab.hostkeys): before the build, every host's
key is checked (an ssh handshake, no login); an unknown one is refused unless
``--accept-new-host-keys`` records it, a changed one always; Fabric's connection then checks
the key again (instead of its AutoAddPolicy).
"""
from __future__ import annotations

import dataclasses
import io
import shlex
import tarfile
import time
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
from kvmlab.lab import hostkeys, steps
from kvmlab.lab import runner as lab
from kvmlab.lab.hostkeys import HostKeyError, HostUnreachable, KnownHosts
from kvmlab.lab.inventory import HostSpec, load_hosts
from kvmlab.lab.steps import LabOptions

# the steps the controller does once for every host (the registry's controller steps)
HOST_STEPS_SKIP = steps.CONTROLLER_STEPS
REMOTE_ROOT = "/var/tmp/kvmlab-remote"


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
    groups: list[str] = dataclasses.field(default_factory=list)


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


def _fabric() -> tuple[Any, Any]:
    try:
        import paramiko
        from fabric import Connection
    except ImportError:
        raise LabError("lab --hosts needs Fabric, which is not installed",
                       hint=hostkeys.HOSTS_EXTRA_HINT) from None
    return Connection, paramiko


def _push_and_run(c: Any, settings: Settings, opts: LabOptions, h: HostSpec, bundle: bytes,
                  out_tar: bytes, command_timeout: float, t0: float) -> HostResult:
    # in_stream=False: the hosts never read the controller's stdin (parallel threads)
    c.run(f"rm -rf {REMOTE_ROOT}/lib && mkdir -p {REMOTE_ROOT}", hide=True,
          timeout=command_timeout, in_stream=False)
    for name, data in (("bundle.tar.gz", bundle), ("out.tar.gz", out_tar)):
        c.put(io.BytesIO(data), f"{REMOTE_ROOT}/{name}")
        c.run(f"tar -xzf {REMOTE_ROOT}/{name} -C {REMOTE_ROOT}", hide=True,
              timeout=command_timeout, in_stream=False)
    r = c.run(remote_command(opts), hide=True, warn=True, timeout=command_timeout,
              in_stream=False)
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
    return HostResult(h.label, r.ok, time.monotonic() - t0, summary, output, lock,
                      list(h.groups))


def _run_one(settings: Settings, opts: LabOptions, h: HostSpec, bundle: bytes, out_tar: bytes,
             connect_timeout: float, command_timeout: float,
             accept_new: bool = False) -> HostResult:
    Connection, paramiko = _fabric()
    t0 = time.monotonic()
    kh = KnownHosts.of(settings)
    kw: dict[str, Any] = {"banner_timeout": connect_timeout, "auth_timeout": connect_timeout}
    if h.key:
        kw["key_filename"] = h.key

    def failed(summary: str) -> HostResult:
        return HostResult(h.label, False, time.monotonic() - t0, summary, groups=list(h.groups))
    try:
        with Connection(h.address, user=h.user, port=h.port, connect_kwargs=kw,
                        connect_timeout=connect_timeout) as c:
            # Fabric's Connection comes with AutoAddPolicy: check keys as ssh does instead
            hostkeys.prepare_client(c.client, kh, h.name, h.address, h.port, accept_new)
            return _push_and_run(c, settings, opts, h, bundle, out_tar, command_timeout, t0)
    except HostKeyError as e:
        return failed(f"refused: {e.message}")
    except paramiko.BadHostKeyException as e:
        err = hostkeys.changed_error(kh, h.name, h.address, h.port, e)
        return failed(f"refused: {err.message}")
    except (OSError, EOFError, paramiko.SSHException, CommandTimedOut, UnexpectedExit) as e:
        # unreachable, refused, auth failure, dropped connection, timeout, a setup command failed
        msg = f"{type(e).__name__}: {e}".strip()
        return failed(f"unreachable or failed: {msg}")


def run_on_hosts(settings: Settings, opts: LabOptions, hosts: list[HostSpec], *,
                 connect_timeout: float = 10, command_timeout: float = 900,
                 accept_new: bool = False) -> list[HostResult]:
    bundle = make_bundle(settings)
    out_tar = _out_tarball(settings, opts.recipe, opts.builder)
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        futs = [pool.submit(_run_one, settings, opts, h, bundle, out_tar, connect_timeout,
                            command_timeout, accept_new) for h in hosts]
        return [f.result() for f in futs]


def check_host_keys(settings: Settings, hosts: list[HostSpec], accept_new: bool,
                    timeout: float = 10) -> None:
    """Every ssh host's key, checked before anything is built, pushed or run: one LabError
    naming every refused key (a table of them first when there are several). A host that
    does not answer is left to the run, which reports it."""
    kh = KnownHosts.of(settings)
    ssh_hosts = [h for h in hosts if h.connection == "ssh"]

    def one(h: HostSpec) -> HostKeyError | None:
        try:
            hostkeys.check_host(kh, h.name, h.address, h.port, accept_new, timeout)
        except HostKeyError as e:
            return e
        except HostUnreachable:
            pass
        return None
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(ssh_hosts)))) as pool:
        found = list(pool.map(one, ssh_hosts))
    refused = [(h, e) for h, e in zip(ssh_hosts, found, strict=True) if e]
    if not refused:
        return
    if len(refused) > 1:
        ui.table("host keys refused", ["host", "why"], [(h.label, e.message)
                                                         for h, e in refused])
    first = refused[0][1]
    more = ""
    if len(refused) > 1:
        more = f" (and {len(refused) - 1} more: {', '.join(h.label for h, _ in refused[1:])})"
    raise type(first)(first.message + more, hint=first.hint)


def ssh_hosts_of(inventory: str) -> list[HostSpec]:
    """The inventory's hosts, all of which lab must reach over ssh."""
    hosts = load_hosts(inventory)
    other = [h for h in hosts if h.connection != "ssh"]
    if other:
        raise LabError(f"lab --hosts runs its steps over ssh: {other[0].label} is a "
                       f"{other[0].connection} host in {inventory}",
                       hint="select the ssh hosts with FILE:GROUP (or verify --hosts checks "
                            "local and docker hosts)")
    return hosts


def run_hosts(settings: Settings, opts: LabOptions, inventory: str,
              accept_new: bool = False) -> list[HostResult]:
    """`invoke lab --hosts FILE`: host keys checked, local build once, then the host-side steps
    on every host."""
    hosts = ssh_hosts_of(inventory)
    check_host_keys(settings, hosts, accept_new)
    local_skip = tuple(n for n in steps.NAMES if n not in HOST_STEPS_SKIP)
    with ui.console.status("lab: building once on the controller") as status:
        res = lab.run_lab(settings, dataclasses.replace(opts, skip=local_skip),
                          on_step=lambda st: status.update(f"lab (controller): {st} ..."))
    lab.print_summary(res)
    if res.error and res.failed:
        raise LabError(f"lab stopped at {res.failed.step}: {res.error.message}",
                       hint=res.error.hint)
    with ui.console.status(f"lab: host-side steps on {len(hosts)} host(s)"):
        results = run_on_hosts(settings, opts, hosts, accept_new=accept_new)
    ui.table("lab on hosts", ["host", "groups", "status", "time", "summary"],
             [(r.host, ",".join(r.groups) or "-", "ok" if r.ok else "failed",
               f"{r.seconds:.1f}s", r.summary) for r in results])
    bad = [r for r in results if not r.ok]
    if bad:
        raise LabError(f"{len(bad)} of {len(results)} host(s) failed: " +
                       ", ".join(r.host for r in bad),
                       hint="see the table above" + ("; the other hosts completed"
                                                     if len(bad) < len(results) else ""))
    return results
