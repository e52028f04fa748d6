"""build: configure + make a prepared (fetched, unpacked, patched) source tree in a builder container
(docker SDK) or on the host (``native``), then collect the recipe's artifacts into
``out/<recipe>/<builder>/`` with a manifest.json.

Layout of the output (binding for install and the other steps)::

    out/<recipe>/<builder>/bin/<basename of each artifacts.binaries>
    out/<recipe>/<builder>/pc-bios/<basename of each artifacts.firmware / option_roms>
    out/<recipe>/<builder>/manifest.json

manifest.json "runtime_deps": one entry per DT_NEEDED soname of the ELF artifacts --
``{soname, needed_by: [artifact paths], builder_path, builder_package, runtime_package}`` --
found by one ldd + ``dpkg -S`` (``rpm -qf`` in a centos builder, the host's for native) run
after the build; runtime_package is the Debian package to install on a Debian host (the dpkg
owner without its ``:arch``; None for rpm builders). install checks them before copying.

The build tree is kept in ``work/<recipe>/build-<builder>`` (manifest "build_dir") and is mounted
into the container at the same absolute path, so its Makefiles also work from the host (make
install). A build whose inputs (recipe, source, patches, image, configure args, cflags, env) hash to
the value recorded in the manifest is a no-op that does not contact docker.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core import ui
from kvmlab.core.errors import BuildError, DockerError
from kvmlab.core.fsutil import json_sha256, sha256_file
from kvmlab.core.proc import sigterm_as_interrupt
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe, load_recipe

CCACHE_VOLUME = "kvmlab-ccache"  # KVMLAB_CCACHE_VOLUME overrides it (benchmarks: a cold cache)
CCACHE_DIR = "/ccache"
CONTAINER_PATH = ("/usr/lib/ccache:/usr/lib64/ccache:/usr/local/sbin:/usr/local/bin:"
                  "/usr/sbin:/usr/bin:/sbin:/bin")
COMPILER_FILE = ".kvmlab-compiler"
DONE_FILE = ".kvmlab-built"  # in the build tree: inputs hash of the build that completed there
LABEL = "io.kvmlab.build.qemu"
TAIL_LINES = 40
MANIFEST = "manifest.json"
DEFAULT_TIMEOUT = float(os.environ.get("KVMLAB_BUILD_TIMEOUT", "7200"))
RUNTIME_DEPS = "runtime_deps"     # manifest key: what the artifacts need at run time
DEPS_TIMEOUT = 300.0


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    manifest: dict
    noop: bool


# --------------------------------------------------------------------------------------------
# helpers

_sha = json_sha256


def ccache_volume() -> str:
    return os.environ.get("KVMLAB_CCACHE_VOLUME") or CCACHE_VOLUME


def build_dir(settings: Settings, recipe: str, builder: str) -> Path:
    return settings.work(recipe) / f"build-{builder}"


def log_path(settings: Settings, recipe: str, builder: str) -> Path:
    return settings.work(recipe) / f"build-{builder}.log"


@contextmanager
def build_lock(settings: Settings, recipe: str, builder: str) -> Iterator[None]:
    """One build per recipe at a time: builds share the prepared source tree (work/<recipe>/src),
    and per builder the build tree and out/."""
    import fcntl
    path = settings.work(recipe) / ".build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise BuildError(f"another build of {recipe} is running (pid {holder})",
                             hint="wait for it to finish, or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


class _LogSink:
    """Writes build output to the terminal (unless quiet) and the log file; keeps the tail."""

    def __init__(self, path: Path, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = ""
        self._f = open(path, "w", encoding="utf-8", errors="replace")

    def write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()
        if not self.quiet:
            sys.stdout.write(text)
            sys.stdout.flush()
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        self.tail.extend(lines)

    def close(self) -> None:
        if self._partial:
            self.tail.append(self._partial)
            self._partial = ""
        self._f.close()

    def show_tail(self) -> None:
        print(f"---- last {len(self.tail)} lines of {self.path} ----", file=sys.stderr)
        for ln in self.tail:
            print(ln, file=sys.stderr)
        print("----", file=sys.stderr, flush=True)


def _commands(recipe: Recipe, builder: str, jobs: int) -> tuple[list[str], list[str]]:
    configure = recipe.configure_args(builder)
    make = [a.replace("{jobs}", str(jobs)) for a in recipe.build.get("make") or ["make"]]
    return configure, make


def with_prefix_map(configure: list[str], bdir: Path) -> list[str]:
    """Configure args that make the build independent of where its tree lives: the build
    directory is mapped to "." in debug info, __FILE__ and macros (-ffile-prefix-map), merged into
    the one --extra-cflags qemu's configure honours (a second one would replace the first)."""
    flag = f"-ffile-prefix-map={bdir}=."
    out, merged = [], False
    for a in configure:
        if a.startswith("--extra-cflags=") and not merged:
            a, merged = f"{a} {flag}", True
        out.append(a)
    return out if merged else out + [f"--extra-cflags={flag}"]


def _env(recipe: Recipe, builder: str) -> dict[str, str]:
    b = recipe.builder(builder)
    env = {str(k): str(v) for k, v in (recipe.build.get("env") or {}).items()}
    env.update({str(k): str(v) for k, v in b.env.items()})
    if b.cflags:
        env["CFLAGS"] = (env.get("CFLAGS", "") + " " + b.cflags).strip()
    return env


def _script(configure: list[str], make: list[str]) -> str:
    """The shell script run in the builder: compiler version, configure, make (argument lists
    quoted with shlex; no user input is interpreted by the shell)."""
    c = " ".join(shlex.quote(a) for a in configure)
    m = " ".join(shlex.quote(a) for a in make)
    return "\n".join([
        "set -e",
        f"cc --version 2>/dev/null | head -n 1 > {COMPILER_FILE} || true",
        f"echo '+ {c}'" if "'" not in c else "true",
        c,
        f"echo '+ {m}'" if "'" not in m else "true",
        m,
    ])


def source_date_epoch(src: Path) -> int:
    """A stable timestamp for reproducible builds: the newest mtime of the top-level source files
    as unpacked (tar mtimes)."""
    best = 0
    for name in ("VERSION", "KVM_VERSION", "configure", "Makefile"):
        p = src / name
        if p.is_file():
            best = max(best, int(p.stat().st_mtime))
    return best or 1262304000


# --------------------------------------------------------------------------------------------
# config read from the build tree

def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    return v


def read_build_config(bdir: Path) -> dict[str, str | None]:
    """prefix and datadir (CONFIG_QEMU_SHAREDIR, the firmware dir compiled into the binary)."""
    prefix = datadir = None
    mak: dict[str, str] = {}
    p = bdir / "config-host.mak"
    if p.is_file():
        for line in p.read_text(errors="replace").splitlines():
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[:+]?=\s*(.*)$", line)
            if m and m.group(1) not in mak:
                mak[m.group(1)] = m.group(2).strip()
    h = bdir / "config-host.h"
    if h.is_file():
        for line in h.read_text(errors="replace").splitlines():
            m = re.match(r'^\s*#\s*define\s+CONFIG_QEMU_SHAREDIR\s+(".*")', line)
            if m:
                datadir = _unquote(m.group(1))
    if "prefix" in mak:
        prefix = _unquote(mak["prefix"])
    if datadir is None and "CONFIG_QEMU_SHAREDIR" in mak:
        datadir = _unquote(mak["CONFIG_QEMU_SHAREDIR"])
    if datadir is None and "datadir" in mak:
        datadir = _unquote(mak["datadir"])
        if prefix is not None:
            datadir = datadir.replace("${prefix}", prefix).replace("$(prefix)", prefix)
    return {"prefix": prefix, "datadir": datadir}


# --------------------------------------------------------------------------------------------
# runtime dependencies: DT_NEEDED of each ELF artifact -> library file in the builder -> package

def elf_needed(path: Path) -> list[str] | None:
    """The DT_NEEDED sonames of an ELF file, in order, read through its program headers (the
    loader's view; works on stripped files). None: not an ELF file; []: static or no dynamic
    section."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    e = "<" if data[5] == 1 else ">"
    try:
        if data[4] == 2:   # ELF64
            phoff, = struct.unpack_from(e + "Q", data, 0x20)
            phentsize, phnum = struct.unpack_from(e + "HH", data, 0x36)
            phdr, dyn = e + "IIQQQQQQ", e + "qQ"
            fields = lambda f: (f[0], f[2], f[3], f[5])  # noqa: E731 - type, offset, vaddr, filesz
        else:              # ELF32
            phoff, = struct.unpack_from(e + "I", data, 0x1C)
            phentsize, phnum = struct.unpack_from(e + "HH", data, 0x2A)
            phdr, dyn = e + "IIIIIIII", e + "iI"
            fields = lambda f: (f[0], f[1], f[2], f[4])  # noqa: E731
        loads, dynamic = [], None
        for i in range(phnum):
            p_type, off, vaddr, filesz = fields(struct.unpack_from(phdr, data, phoff + i * phentsize))
            if p_type == 1:      # PT_LOAD
                loads.append((vaddr, off, filesz))
            elif p_type == 2:    # PT_DYNAMIC
                dynamic = (off, filesz)
        if dynamic is None:
            return []
        needed, strtab = [], None
        step = struct.calcsize(dyn)
        for pos in range(dynamic[0], dynamic[0] + dynamic[1] - step + 1, step):
            tag, val = struct.unpack_from(dyn, data, pos)
            if tag == 0:         # DT_NULL
                break
            if tag == 1:         # DT_NEEDED: offset into the string table
                needed.append(val)
            elif tag == 5:       # DT_STRTAB: an address
                strtab = next((val - va + off for va, off, sz in loads if va <= val < va + sz),
                              None)
        if strtab is None:
            return [] if not needed else None
        out = []
        for n in needed:
            start = strtab + n
            out.append(data[start:data.index(b"\0", start)].decode("utf-8", "replace"))
        return out
    except (struct.error, ValueError, IndexError):
        return None


def deps_script(binaries: list[str]) -> str:
    """POSIX sh run once in the builder (or on the host for native): ldd of every binary, the
    real path of each library it resolved, and which package owns it (dpkg -S or rpm -qf). Each
    section starts with a @@ marker line; parse_deps_output reads it. Library paths are assumed
    to contain no blanks (they never do in a distribution)."""
    bins = " ".join(shlex.quote(b) for b in binaries)
    return "\n".join([
        "LC_ALL=C; export LC_ALL",
        f"for b in {bins}; do echo \"@@ldd $b\"; ldd \"$b\" 2>&1; done",
        f"paths=$(for b in {bins}; do ldd \"$b\" 2>/dev/null; done"
        " | sed -n 's#^[^/]*=> \\(/[^ ]*\\) (.*#\\1#p' | sort -u)",
        "cands=''",
        "echo @@real",
        "for p in $paths; do",
        "  r=$(readlink -f \"$p\"); echo \"$p $r\"",
        "  for q in \"$p\" \"$r\"; do",
        "    case \"$q\" in /usr/lib*) a=${q#/usr} ;; /lib*) a=/usr$q ;; *) a=$q ;; esac",
        "    cands=\"$cands $q $a\"",
        "  done",
        "done",
        "if command -v dpkg >/dev/null 2>&1; then",
        "  echo '@@owners dpkg'; [ -n \"$cands\" ] && dpkg -S $cands 2>/dev/null",
        "elif command -v rpm >/dev/null 2>&1; then",
        "  echo '@@owners rpm'",
        "  for q in $cands; do o=$(rpm -qf --qf '%{NAME}\\n' \"$q\" 2>/dev/null) &&"
        " echo \"$o: $q\"; done",
        "else",
        "  echo '@@owners none'",
        "fi",
        "echo @@end",
        "exit 0",
    ])


def _merged_alt(p: str) -> str:
    if p.startswith("/usr/lib"):
        return p[len("/usr"):]
    if p.startswith("/lib"):
        return "/usr" + p
    return p


def parse_deps_output(text: str) -> tuple[dict[str, str | None], dict[str, str], str,
                                          dict[str, str]]:
    """(soname -> library path ldd resolved, or None when "not found"; path -> real path;
    package manager; path -> owning package) from deps_script's output."""
    resolved: dict[str, str | None] = {}
    real: dict[str, str] = {}
    owners: dict[str, str] = {}
    manager, section = "none", ""
    for line in text.splitlines():
        if line.startswith("@@"):
            section = line[2:].split(" ", 1)[0]
            if section == "owners":
                manager = line.split()[1] if len(line.split()) > 1 else "none"
            continue
        if section == "ldd":
            m = re.match(r"^\s*(\S+)\s+=>\s+(?:(/\S+)\s+\(|not found)", line)
            if m and not (m.group(1) in resolved and resolved[m.group(1)]):
                resolved[m.group(1)] = m.group(2)
        elif section == "real":
            parts = line.split()
            if len(parts) == 2:
                real[parts[0]] = parts[1]
        elif section == "owners" and ": /" in line and not line.startswith("diversion "):
            pkgs, path = line.split(": /", 1)
            owners.setdefault("/" + path.strip(), pkgs.split(",")[0].strip())
    return resolved, real, manager, owners


def runtime_deps(elves: list[tuple[str, list[str]]], output: str) -> list[dict[str, Any]]:
    """The manifest's runtime_deps list: one entry per soname any artifact needs.

    elves: (artifact path, its DT_NEEDED) pairs; output: what deps_script printed. Every soname
    is kept, libc.so.6 included: dropping the C library would hide a target that really lacks it
    (musl, another arch), and a present library costs the install check nothing. The ELF
    interpreter (PT_INTERP) is not a DT_NEEDED entry and is not listed."""
    resolved, real, manager, owners = parse_deps_output(output)
    by_soname: dict[str, list[str]] = {}
    for art, needed in elves:
        for so in needed:
            by_soname.setdefault(so, []).append(art)
    out = []
    for so in sorted(by_soname):
        path = resolved.get(so)
        pkg = None
        if path:
            r = real.get(path, path)
            for cand in (path, _merged_alt(path), r, _merged_alt(r)):
                if cand in owners:
                    pkg = owners[cand]
                    break
        runtime = pkg.split(":", 1)[0] if pkg and manager == "dpkg" else None
        out.append({"soname": so, "needed_by": sorted(by_soname[so]), "builder_path": path,
                    "builder_package": pkg, "runtime_package": runtime})
    return out


def _deps_native(bins: list[str], timeout: float) -> str:
    try:
        r = subprocess.run(["/bin/sh", "-c", deps_script(bins)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildError(f"reading the artifacts' runtime dependencies timed out after "
                         f"{timeout:.0f} s") from None
    return r.stdout


def _deps_container(client: Any, image: str, bdir: Path, bins: list[str], log: Path,
                    name: str, timeout: float) -> str:
    sink = _LogSink(log, quiet=True)
    try:
        rc = _run_container(client, image, bdir, deps_script(bins),
                            {"LC_ALL": "C", "PATH": CONTAINER_PATH, "HOME": "/tmp"}, sink, name,
                            timeout)
    finally:
        sink.close()
    text = log.read_text(errors="replace")
    if rc != 0 or "@@end" not in text:
        raise BuildError(f"could not read the artifacts' runtime dependencies in the builder "
                         f"(exit {rc})", hint=f"see {log}")
    return text


# --------------------------------------------------------------------------------------------
# no-op check

def _recorded(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _outputs_intact(out: Path, manifest: dict) -> bool:
    try:
        for a in manifest.get("artifacts", []):
            p = out / a["path"]
            if not p.is_file() or p.stat().st_size != a["size"] or sha256_file(p) != a["sha256"]:
                return False
    except (OSError, KeyError, TypeError):
        return False
    bd = manifest.get("build_dir")
    if not bd:
        return False
    try:  # the kept build tree is the one that produced these artifacts (not a later, failed one)
        return (Path(bd) / DONE_FILE).read_text().strip() == manifest.get("inputs_sha256")
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# running the build

def _image_for(settings: Settings, builder: str, offline: bool, client: Any) -> Any:
    from kvmlab.build import images
    if offline:
        info = images.existing_image(settings, builder, client)
        if info is None:
            repo, tag = images.image_ref(settings, builder, client)
            raise DockerError(f"builder image {repo}:{tag} is missing (and --offline builds "
                              "no images)",
                              hint=f"run `invoke images --builder {builder}` (needs the apt "
                                   "mirror), then build again")
        return info
    return images.ensure_image(settings, builder, client=client)


def _run_container(client: Any, image: str, bdir: Path, script: str, env: dict[str, str],
                   sink: _LogSink, name: str, timeout: float) -> int:
    from docker.errors import APIError, NotFound
    container = None
    try:
        container = client.containers.run(
            image, ["/bin/sh", "-c", script], detach=True, name=name,
            user=f"{os.getuid()}:{os.getgid()}", working_dir=str(bdir),
            volumes={str(bdir): {"bind": str(bdir), "mode": "rw"},
                     ccache_volume(): {"bind": CCACHE_DIR, "mode": "rw"}},
            environment=env, labels={LABEL: "1"}, network_mode="none")
        timed_out = threading.Event()

        def watchdog() -> None:  # a silent, hung build still ends
            timed_out.set()
            try:
                container.kill()
            except Exception:  # noqa: BLE001 - it may have just ended
                pass

        timer = threading.Timer(timeout, watchdog)
        timer.daemon = True
        timer.start()
        try:
            for chunk in container.logs(stream=True, follow=True):
                sink.write(chunk.decode("utf-8", errors="replace"))
            res = container.wait(timeout=120)
        finally:
            timer.cancel()
        if timed_out.is_set():
            raise BuildError(f"build timed out after {timeout:.0f} s and was stopped",
                             hint=f"set KVMLAB_BUILD_TIMEOUT (seconds); log: {sink.path}")
        return int(res.get("StatusCode", 1))
    except APIError as e:
        raise DockerError(f"docker could not run the build: {e.explanation or e}") from None
    finally:
        try:
            if container is not None:
                container.remove(force=True)
            else:
                client.containers.get(name).remove(force=True)
        except NotFound:
            pass
        except Exception as e:  # noqa: BLE001 - report but do not mask the original error
            ui.warn(f"could not remove container {name}: {e}")


def _run_native(bdir: Path, cmds: list[list[str]], env: dict[str, str], sink: _LogSink,
                timeout: float) -> int:
    full_env = {**os.environ, **env}
    if Path("/usr/lib/ccache").is_dir():
        full_env["PATH"] = "/usr/lib/ccache:" + full_env.get("PATH", "")
    deadline = time.monotonic() + timeout
    try:
        out = subprocess.run(["cc", "--version"], capture_output=True, text=True, timeout=30)
        (bdir / COMPILER_FILE).write_text(out.stdout.splitlines()[0] + "\n" if out.stdout else "")
    except (OSError, subprocess.SubprocessError):
        pass
    for cmd in cmds:
        sink.write("+ " + " ".join(shlex.quote(a) for a in cmd) + "\n")
        try:
            p = subprocess.Popen(cmd, cwd=bdir, env=full_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            sink.write(f"cannot run {cmd[0]}: {e.strerror}\n")
            return 127
        timed_out = threading.Event()

        def kill_group() -> None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def watchdog() -> None:  # a silent, hung build still ends
            timed_out.set()
            kill_group()

        timer = threading.Timer(max(0.1, deadline - time.monotonic()), watchdog)
        timer.daemon = True
        timer.start()
        try:
            assert p.stdout is not None
            for line in iter(p.stdout.readline, b""):
                sink.write(line.decode("utf-8", errors="replace"))
            rc = p.wait(timeout=60)
        finally:
            timer.cancel()
            if p.poll() is None:
                kill_group()
                p.wait()
        if timed_out.is_set():
            raise BuildError(f"build timed out after {timeout:.0f} s and was stopped",
                             hint=f"set KVMLAB_BUILD_TIMEOUT (seconds); log: {sink.path}")
        if rc != 0:
            return rc
    return 0


def _copy_tree(src: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, symlinks=True)
    os.replace(tmp, dest)


def _collect(recipe: Recipe, builder: str, bdir: Path, out: Path, manifest: dict,
             deps: Callable[[list[tuple[str, Path, list[str]]]], list[dict]] | None = None
             ) -> dict:
    """Copy artifacts into a temp dir next to out/, write the manifest, rename into place.

    deps: given (artifact path, its source in the build tree, DT_NEEDED) for every dynamically
    linked ELF artifact, returns the manifest's runtime_deps list."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        arts = []
        missing_bins = []
        kinds = (("binaries", "binary", "bin"), ("firmware", "firmware", "pc-bios"),
                 ("option_roms", "option_rom", "pc-bios"))
        for key, kind, sub in kinds:
            for rel in recipe.artifacts.get(key, ()):
                src = bdir / rel
                if not src.is_file():
                    if kind == "binary":
                        missing_bins.append(rel)
                    else:
                        ui.warn(f"{kind.replace('_', ' ')} {rel} was not built/found in {bdir}; "
                                "skipped")
                    continue
                dest = tmp / sub / Path(rel).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
                st = dest.stat()
                arts.append({"path": f"{sub}/{dest.name}", "kind": kind, "source": rel,
                             "sha256": sha256_file(dest), "size": st.st_size,
                             "mode": "%04o" % (st.st_mode & 0o7777)})
        for rel in recipe.artifacts.get("data_dirs", ()):
            # a directory of data files (keymaps): copied whole, kept as pc-bios/<dir>/...
            src_dir = bdir / rel
            if not src_dir.is_dir():
                ui.warn(f"data directory {rel} was not found in {bdir}; skipped")
                continue
            for src in sorted(p for p in src_dir.rglob("*") if p.is_file()):
                sub_rel = src.relative_to(src_dir).as_posix()
                relp = f"pc-bios/{src_dir.name}/{sub_rel}"
                dest = tmp / relp
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
                st = dest.stat()
                arts.append({"path": relp, "kind": "data", "source": f"{rel}/{sub_rel}",
                             "sha256": sha256_file(dest), "size": st.st_size,
                             "mode": "%04o" % (st.st_mode & 0o7777)})
        if missing_bins:
            raise BuildError(f"build finished but {len(missing_bins)} binary(ies) are missing: "
                             + ", ".join(missing_bins),
                             hint=f"check the recipe's artifacts.binaries against {bdir}")
        manifest = {**manifest, "artifacts": arts}
        if deps is not None:
            elves = []
            for a in arts:
                needed = elf_needed(tmp / a["path"])
                if needed:
                    elves.append((a["path"], bdir / a["source"], needed))
            manifest[RUNTIME_DEPS] = deps(elves)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            if not out.exists():  # the swap failed half-way: put the previous output back
                os.replace(old, out)
            else:
                shutil.rmtree(old, ignore_errors=True)


def build(settings: Settings, recipe: Recipe | str, builder: str, *, jobs: int = 2,
          force: bool = False, source: str | Path | None = None, offline: bool = False,
          quiet: bool = False, timeout: float = DEFAULT_TIMEOUT) -> BuildResult:
    """Build a recipe with a builder (debian12, centos6 or native). See the module docstring."""
    if isinstance(recipe, str):
        recipe = load_recipe(settings.recipes_dir, recipe)
    if recipe.kind == "kmod":
        from kvmlab.build import kmod as kmodbuild
        return kmodbuild.build_kmod(settings, recipe, builder, jobs=jobs, force=force,
                                    source=source, offline=offline, quiet=quiet, timeout=timeout)
    recipe.builder(builder)  # RecipeError for an unknown builder
    if jobs < 1:
        raise BuildError(f"--jobs must be at least 1, got {jobs}")
    if source is not None:
        from kvmlab.source.fetch import check_source
        check_source(source, recipe)
    with build_lock(settings, recipe.name, builder):
        return _build(settings, recipe, builder, jobs=jobs, force=force, source=source,
                      offline=offline, quiet=quiet, timeout=timeout)


def _build(settings: Settings, recipe: Recipe, builder: str, *, jobs: int, force: bool,
           source: str | Path | None, offline: bool, quiet: bool, timeout: float) -> BuildResult:
    from kvmlab.build import images
    from kvmlab.source import prepare as pipeline
    prepared = pipeline.prepare(settings, recipe, builder, source=source, offline=offline)
    configure, make = _commands(recipe, builder, jobs)
    env = _env(recipe, builder)
    out = settings.out(recipe.name, builder)
    bdir = build_dir(settings, recipe.name, builder)
    log = log_path(settings, recipe.name, builder)

    client = None
    image_ref = None
    # the image: docker/<builders.NAME.image> when the recipe names one (e.g. debian12-el6),
    # else docker/<builder>
    img_builder = recipe.builder(builder).image or builder
    if builder != "native":
        dockerfile = images.docker_dir(settings, img_builder) / "Dockerfile"
        if images.local_base_name(dockerfile) is None:  # tag depends on a local image's id
            client = images.docker_client()
        repo, tag = images.image_ref(settings, img_builder, client)
        image_ref = f"{repo}:{tag}"
    inputs = {"recipe_sha256": recipe.sha256, "source_sha256": prepared.source_sha256,
              "patches": [dict(p) for p in prepared.patches], "image": image_ref,
              "builder": builder, "configure_args": configure,
              "cflags": recipe.builder(builder).cflags, "env": env}
    inputs_sha = _sha(inputs)

    recorded = _recorded(out)
    if not force and recorded and recorded.get("inputs_sha256") == inputs_sha \
            and _outputs_intact(out, recorded):
        ui.info(f"[cyan]no-op[/cyan]: {recipe.name} ({builder}) is up to date; artifacts in {out}")
        return BuildResult(out, recorded, True)

    image_id = None
    if builder != "native":
        client = client or images.docker_client()
        info = _image_for(settings, img_builder, offline, client)
        image_ref, image_id = info.ref, info.id

    settings.work(recipe.name).mkdir(parents=True, exist_ok=True)
    ui.info(f"building {recipe.name} with {builder} "
            f"({image_ref or 'host toolchain'}) in {bdir}; log: {log}")
    t0 = time.monotonic()
    sink = None
    try:
        with sigterm_as_interrupt():
            _copy_tree(Path(prepared.src_dir), bdir)
            t_copy = time.monotonic() - t0
            (bdir / COMPILER_FILE).unlink(missing_ok=True)
            sink = _LogSink(log, quiet=quiet)
            env_run = {**env, "SOURCE_DATE_EPOCH": str(source_date_epoch(bdir)), "HOME": "/tmp",
                       "LC_ALL": "C"}
            t_run0 = time.monotonic()
            name = f"kvmlab-build-{re.sub(r'[^A-Za-z0-9_.-]', '-', recipe.name)}-{builder}-" \
                   f"{os.getpid()}"
            if builder == "native":
                rc = _run_native(bdir, [with_prefix_map(configure, bdir), make], env_run, sink,
                                 timeout)
            else:
                env_run.update({"CCACHE_DIR": CCACHE_DIR, "PATH": CONTAINER_PATH})
                rc = _run_container(client, image_ref, bdir,
                                    _script(with_prefix_map(configure, bdir), make), env_run,
                                    sink, name, timeout)
            t_run = time.monotonic() - t_run0
            sink.close()
            if rc != 0:
                sink.show_tail()
                raise BuildError(f"build of {recipe.name} with {builder} failed (exit {rc})",
                                 hint=f"full log: {log}; build tree: {bdir}")
            cfile = bdir / COMPILER_FILE
            compiler = cfile.read_text(errors="replace").strip() if cfile.is_file() else ""
            manifest = {
                "recipe": recipe.name, "recipe_sha256": recipe.sha256, "builder": builder,
                "image": image_ref, "image_id": image_id,
                "source_sha256": prepared.source_sha256,
                "patches": [{"name": p["name"], "sha256": p["sha256"]} for p in prepared.patches],
                "configure_args": configure, "make": make, "cflags": inputs["cflags"],
                "env": env, "compiler": compiler, "config": read_build_config(bdir),
                "build_dir": str(bdir), "log": str(log), "inputs_sha256": inputs_sha,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.monotonic() - t0, 1),
                # where the time went: copying the tree, configure+make (container/host run)
                "timings": {"copy": round(t_copy, 3), "run": round(t_run, 3)},
            }
            (bdir / DONE_FILE).write_text(inputs_sha + "\n")

            def deps(elves: list[tuple[str, Path, list[str]]]) -> list[dict]:
                """One ldd + dpkg -S/rpm -qf run where the artifacts were linked."""
                if not elves:
                    return []
                t_deps = time.monotonic()
                bins = [str(src) for _, src, _ in elves]
                if builder == "native":
                    text = _deps_native(bins, DEPS_TIMEOUT)
                else:
                    text = _deps_container(client, image_ref, bdir, bins,
                                           settings.work(recipe.name) / f"build-{builder}-deps.log",
                                           f"{name}-deps", DEPS_TIMEOUT)
                manifest["timings"]["deps"] = round(time.monotonic() - t_deps, 3)
                return runtime_deps([(a, n) for a, _, n in elves], text)

            manifest = _collect(recipe, builder, bdir, out, manifest, deps)
    finally:
        if sink is not None and not sink._f.closed:
            sink.close()
    n = len(manifest["artifacts"])
    ui.info(f"[green]built[/green] {recipe.name} ({builder}) in {time.monotonic() - t0:.0f} s: "
            f"{n} artifact(s) in {out}")
    return BuildResult(out, manifest, False)


def clean(settings: Settings, recipe: str, builder: str, *, all_work: bool = False) -> list[Path]:
    """Remove the build tree, its log and out/<recipe>/<builder> (keeps caches and the ccache
    volume). all_work also removes work/<recipe> entirely (unpacked source included)."""
    targets = [build_dir(settings, recipe, builder), log_path(settings, recipe, builder),
               settings.out(recipe, builder)]
    if all_work:
        targets.append(settings.work(recipe))
    removed = []
    for t in targets:
        if t.is_dir() and not t.is_symlink():
            shutil.rmtree(t)
            removed.append(t)
        elif t.exists() or t.is_symlink():
            t.unlink()
            removed.append(t)
    return removed
