"""Builder images: a locally made Debian base (debootstrap + docker import) and one Dockerfile per
builder in docker/<builder>/, built with the docker SDK and tagged with a hash of their inputs.

No container registry is needed for debian12: the base comes from the host's configured apt mirror.
centos6 needs a ``centos:6`` image present locally (``docker load -i centos6.tar``); it is never
pulled.

Tags:
    kvmlab/base-debian12:<hash of suite, variant, mirror, components, arch, recipe version>
    kvmlab/<builder>:<hash of the docker/<builder>/ files + the base tag (debian12) or id (centos6)>
Both also get a ``latest`` tag for humans; kvmlab itself only uses the hashed tags.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.build.aptsources import (
    DEBIAN_SUITE,
    AptSource,
    debian_mirror,
)
from kvmlab.core import proc, ui
from kvmlab.core.errors import DockerError, KvmlabError
from kvmlab.core.fsutil import json_sha256
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe

# debian12-kmod: kvmlab.build.kmod
IMAGE_BUILDERS = ("debian12", "centos6", "debian12-kmod", "debian12-el6", "centos6-el6")
BASE_REPO = "kvmlab/base-{name}"
IMAGE_REPO = "kvmlab/{builder}"
LABEL_INPUTS = "io.kvmlab.inputs"
DEBOOTSTRAP_TIMEOUT = 1800
# Bump when the way the base is made changes (forces a new tag).
BASE_RECIPE_VERSION = 1
CENTOS6_DEFAULT_BASE = "centos:6"
DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"


@dataclass(frozen=True)
class ImageInfo:
    name: str   # repository, e.g. kvmlab/debian12
    tag: str    # the inputs hash
    id: str     # sha256:...
    noop: bool  # True when the image already existed

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


# --------------------------------------------------------------------------------------------
# docker client

def docker_url() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL


def _start_hint(url: str) -> str:
    if url.startswith("unix://") and url != DEFAULT_DOCKER_URL:
        where = f"check DOCKER_HOST={url} (unset it to use {DEFAULT_DOCKER_URL})"
        return where + "; or start the daemon: `setsid dockerd >/var/log/dockerd.log 2>&1 " \
                       "</dev/null &` (no systemd) or `systemctl start docker`"
    return ("start it: `setsid dockerd >/var/log/dockerd.log 2>&1 </dev/null &` (no systemd) or "
            "`systemctl start docker`; or use `--builder native` to build on this host")


def docker_client(timeout: int = 120) -> Any:
    """A pinged docker.DockerClient, or DockerError saying how to start/reach the daemon."""
    try:
        # the module, not the package: mypy would take the project's docker/ directory
        # (the builders' Dockerfiles) for a namespace package named docker
        from docker.client import from_env
        from docker.errors import DockerException
    except ImportError:  # pragma: no cover - dependency of the package
        raise DockerError("the docker Python SDK is not installed",
                          hint="pip install 'docker>=7.1'") from None
    url = docker_url()
    try:
        client = from_env(timeout=timeout)
        client.ping()
        return client
    except DockerException as e:
        text = str(e)
        if "Permission denied" in text or "PermissionError" in text:
            raise DockerError(f"permission denied on the docker socket at {url}",
                              hint="add yourself to the docker group "
                                   "(`sudo usermod -aG docker $USER`, then log in again) "
                                   "or run as root") from None
        raise DockerError(f"docker daemon is not running / not reachable at {url}",
                          hint=_start_hint(url)) from None
    except Exception as e:  # requests/urllib3 errors during ping
        raise DockerError(f"docker daemon is not running / not reachable at {url} ({e})",
                          hint=_start_hint(url)) from None


def find_image(client: Any, ref: str) -> Any | None:
    from docker.errors import ImageNotFound
    try:
        return client.images.get(ref)
    except ImageNotFound:
        return None


# --------------------------------------------------------------------------------------------
# hashing

_sha = json_sha256


def dir_hash(path: Path) -> str:
    """sha256 over the relative names, modes (x bit) and contents of every file under path."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0")
        h.update(b"x" if os.access(p, os.X_OK) else b"-")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _arch() -> str:
    try:
        return str(proc.run(["dpkg", "--print-architecture"], timeout=10,
                            check=True).stdout).strip()
    except KvmlabError:
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def base_inputs(name: str = "debian12") -> dict[str, Any]:
    if name != "debian12":
        raise DockerError(f"no locally made base image for {name!r}",
                          hint="only debian12 has a debootstrap base")
    m = debian_mirror()
    return {"suite": DEBIAN_SUITE, "variant": "minbase", "mirror": m.uri, "components": ["main"],
            "arch": _arch(), "v": BASE_RECIPE_VERSION}


def base_ref(name: str = "debian12") -> str:
    return f"{BASE_REPO.format(name=name)}:{_sha(base_inputs(name))[:16]}"


def docker_dir(settings: Settings, builder: str) -> Path:
    d = settings.docker_dir / builder
    if not (d / "Dockerfile").is_file():
        raise DockerError(f"no Dockerfile for builder {builder!r} ({d / 'Dockerfile'})",
                          hint="builders with images: " + ", ".join(IMAGE_BUILDERS) +
                          "; or `--builder native`")
    return d


def dockerfile_base_default(dockerfile: Path) -> str:
    """The default of `ARG BASE=...` in a Dockerfile ('' when there is none)."""
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"^\s*ARG\s+BASE=(\S+)", line)
        if m:
            return m.group(1).strip("\"'")
    return ""


def local_base_name(dockerfile: Path) -> str | None:
    """'debian12' when the Dockerfile builds on the local debootstrap base
    (ARG BASE=kvmlab/base-debian12[:tag]); None for an external base such as centos:6."""
    default = dockerfile_base_default(dockerfile)
    prefix = BASE_REPO.format(name="")
    if default.startswith(prefix):
        return default[len(prefix):].split(":", 1)[0] or None
    return None


def image_inputs(settings: Settings, builder: str, client: Any | None = None,
                 buildargs: Mapping[str, str] | None = None) -> tuple[dict, str]:
    """(inputs, base reference) of a builder image. Images on the local debootstrap base
    (debian12 and its variants) need no docker: the base tag is a hash of its own inputs; an
    external base (centos6: centos:6) contributes the id of the local image. Extra build
    arguments (``buildargs``, e.g. the labvm's EXTRA_PACKAGES) are inputs too."""
    d = docker_dir(settings, builder)
    local = local_base_name(d / "Dockerfile")
    extra = {"buildargs": dict(sorted(buildargs.items()))} if buildargs else {}
    if local:
        base = base_ref(local)
        return {"builder": builder, "files": dir_hash(d), "base": base, **extra}, base
    base = dockerfile_base_default(d / "Dockerfile") or CENTOS6_DEFAULT_BASE
    if client is None:
        client = docker_client()
    img = find_image(client, base)
    return {"builder": builder, "files": dir_hash(d), "base": base,
            "base_id": img.id if img else None, **extra}, base


def image_ref(settings: Settings, builder: str, client: Any | None = None,
              buildargs: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(repository, tag) the builder image has for the current inputs."""
    inputs, _ = image_inputs(settings, builder, client, buildargs)
    return IMAGE_REPO.format(builder=builder), _sha(inputs)[:16]


# --------------------------------------------------------------------------------------------
# debootstrap base

def _mounts_under(path: Path) -> list[str]:
    out = []
    prefix = str(path.resolve())
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == prefix or mp.startswith(prefix + "/"):
                    out.append(mp)
    except OSError:
        pass
    return out


def safe_rmtree(path: Path) -> None:
    """Remove a chroot-like tree: unmount anything mounted inside it first, never cross mounts."""
    if not path.exists():
        return
    for mp in sorted(_mounts_under(path), key=len, reverse=True):
        try:
            proc.run(["umount", "-l", mp], timeout=60)
        except KvmlabError:
            pass  # still mounted: reported below
    left = _mounts_under(path)
    if left:
        raise DockerError(f"cannot remove {path}: still mounted: {', '.join(left)}",
                          hint="unmount them by hand, then delete the directory")
    shutil.rmtree(path, ignore_errors=True)


def _run_logged(cmd: list[str], log: Path, timeout: float, what: str) -> None:
    ui.info(f"[dim]$ {' '.join(cmd)}[/dim]")
    with open(log, "ab") as lf:
        lf.write(("$ " + " ".join(cmd) + "\n").encode())
        lf.flush()
        try:
            p = proc.run(cmd, stdout=lf, stderr=proc.STDOUT, timeout=timeout)
        except proc.CommandTimeout:
            raise DockerError(f"{what} timed out after {timeout:.0f} s",
                              hint=f"see {log}") from None
    if p.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        for ln in tail:
            print(ln, file=sys.stderr)
        raise DockerError(f"{what} failed (exit {p.returncode})", hint=f"full log: {log}")


def _tar_stream(root: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    p = proc.spawn(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", "-", "."],
                   stdout=proc.PIPE, stderr=proc.PIPE)
    try:
        assert p.stdout is not None
        while True:
            b = p.stdout.read(chunk)
            if not b:
                break
            yield b
        rc = p.wait(timeout=600)
        if rc != 0:
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            raise DockerError(f"tar of the base image failed (exit {rc}): {err.strip()[:300]}")
    finally:
        proc.kill_group(p)


def ensure_base_image(settings: Settings, name: str = "debian12", *, force: bool = False,
                      client: Any | None = None) -> ImageInfo:
    """kvmlab/base-debian12:<hash>: debootstrap --variant=minbase bookworm + docker import."""
    client = client or docker_client()
    inputs = base_inputs(name)
    repo = BASE_REPO.format(name=name)
    tag = _sha(inputs)[:16]
    ref = f"{repo}:{tag}"
    img = find_image(client, ref)
    if img is not None and not force:
        return ImageInfo(repo, tag, img.id, True)
    if os.geteuid() != 0:
        raise DockerError("making the debian12 base image needs root (debootstrap)",
                          hint=f"run `sudo invoke images --builder {name}` once, "
                               "or `docker load` a saved kvmlab base image")
    if shutil.which("debootstrap") is None:
        raise DockerError("debootstrap is not installed", hint="apt-get install debootstrap")
    mirror = debian_mirror()
    log_dir = settings.work_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"base-{name}.log"
    log.write_bytes(b"")
    ui.info(f"making base image {ref}: debootstrap {DEBIAN_SUITE} from {mirror.uri} "
            f"(log: {log})")
    t0 = time.monotonic()
    with proc.sigterm_as_interrupt():
        img = _debootstrap_and_import(client, inputs, mirror, repo, tag, log)
    ui.info(f"[green]built[/green] {ref} ({img.id[:19]}) in {time.monotonic() - t0:.0f} s")
    return ImageInfo(repo, tag, img.id, False)


def _debootstrap_and_import(client: Any, inputs: dict, mirror: AptSource, repo: str, tag: str,
                            log: Path) -> Any:
    ref = f"{repo}:{tag}"
    tmp = Path(tempfile.mkdtemp(prefix=f"kvmlab-base-{inputs['suite']}-", dir="/var/tmp"))
    root = tmp / "rootfs"
    try:
        cmd = ["debootstrap", "--variant=minbase", f"--arch={inputs['arch']}"]
        if mirror.signed_by and Path(mirror.signed_by).is_file():
            cmd.append(f"--keyring={mirror.signed_by}")
        cmd += [DEBIAN_SUITE, str(root), mirror.uri]
        _run_logged(cmd, log, DEBOOTSTRAP_TIMEOUT, "debootstrap")
        # Trim what a container does not need; `apt-get update` refills the lists.
        for sub in ("var/lib/apt/lists", "var/cache/apt/archives"):
            d = root / sub
            if d.is_dir():
                for p in d.iterdir():
                    if p.is_file() and p.name != "lock":
                        p.unlink()
        for p in (root / "var/cache/apt").glob("*.bin"):
            p.unlink()
        for p in (root / "var/log").rglob("*"):
            if p.is_file():
                p.unlink()
        if _mounts_under(root):
            raise DockerError(f"debootstrap left mounts under {root}",
                              hint="unmount them and retry")
        ui.info(f"importing {ref} ...")
        res = client.api.import_image_from_stream(
            _tar_stream(root), repository=repo, tag=tag,
            changes=['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8",
                     f"LABEL {LABEL_INPUTS}={_sha(inputs)}"])
        img = find_image(client, ref)
        if img is None:
            raise DockerError(f"docker import did not create {ref}: {str(res)[:300]}")
        img.tag(repo, "latest")
    except KeyboardInterrupt:
        ui.warn("interrupted; removing the partial base tree")
        raise
    finally:
        safe_rmtree(tmp)
    return img


# --------------------------------------------------------------------------------------------
# builder images

def host_has_vsyscall(maps: str | None = None) -> bool:
    """True when processes get a [vsyscall] mapping (vsyscall=xonly or emulate)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return True
    return "[vsyscall]" in maps


def _missing_base_error(builder: str, base: str) -> DockerError:
    return DockerError(
        f"base image {base} for builder {builder!r} is not available locally "
        "(there is no registry to pull it from)",
        hint=f"either load a saved image: `docker load -i {builder}.tar` (made elsewhere with "
             f"`docker save {base} -o {builder}.tar`), or build with `--builder debian12`")


def _stream_build(client: Any, ctx: Path, ref: str, buildargs: dict[str, str], log: Path,
                  nocache: bool, echo: Callable[[str], None]) -> str:
    """Run a docker build through the SDK, streaming its log; returns the image id."""
    from docker.errors import APIError
    image_id = ""
    tail: list[str] = []
    with open(log, "w") as lf:
        try:
            for chunk in client.api.build(path=str(ctx), tag=ref, buildargs=buildargs, rm=True,
                                          forcerm=True, pull=False, nocache=nocache, decode=True,
                                          labels={LABEL_INPUTS: ref.split(":")[-1]}):
                if "stream" in chunk:
                    text = chunk["stream"]
                    lf.write(text)
                    lf.flush()
                    for ln in text.splitlines():
                        echo(ln)
                        tail = (tail + [ln])[-40:]
                if "aux" in chunk and "ID" in chunk["aux"]:
                    image_id = chunk["aux"]["ID"]
                if "error" in chunk:
                    msg = chunk["error"].strip()
                    lf.write(msg + "\n")
                    for ln in tail[-30:]:
                        print(ln, file=sys.stderr)
                    raise DockerError(f"building image {ref} failed: {msg.splitlines()[-1][:300]}",
                                      hint=f"full log: {log}")
        except APIError as e:
            raise DockerError(f"building image {ref} failed: {e.explanation or e}",
                              hint=f"full log: {log}") from None
    return image_id


def ensure_image(settings: Settings, builder: str, *, force: bool = False,
                 client: Any | None = None, quiet: bool = False,
                 buildargs: Mapping[str, str] | None = None) -> ImageInfo:
    """The builder image kvmlab/<builder>:<inputs hash>, built from docker/<builder>/ if missing
    (``buildargs``: extra ARG values, part of the tag)."""
    if builder == "native" or not (settings.docker_dir / builder / "Dockerfile").is_file():
        raise DockerError(f"builder {builder!r} has no image",
                          hint="image builders: " + ", ".join(IMAGE_BUILDERS) +
                          ("" if builder == "native" else "; or `--builder native`"))
    client = client or docker_client()
    ctx = docker_dir(settings, builder)
    repo, tag = image_ref(settings, builder, client, buildargs)
    ref = f"{repo}:{tag}"
    img = find_image(client, ref)
    if img is not None and not force:
        return ImageInfo(repo, tag, img.id, True)
    local = local_base_name(ctx / "Dockerfile")
    if local:
        base = ensure_base_image(settings, local, client=client)
        base_name = base.ref
    else:
        base_name = dockerfile_base_default(ctx / "Dockerfile") or CENTOS6_DEFAULT_BASE
        if find_image(client, base_name) is None:
            raise _missing_base_error(builder, base_name)
        if base_name.startswith("centos:6") and not host_has_vsyscall():
            raise DockerError("this kernel has no vsyscall page (vsyscall=none): CentOS 6's "
                              "glibc 2.12 crashes in every container (exit 139)",
                              hint="boot the host with vsyscall=xonly (the default) or "
                                   "vsyscall=emulate, or use `--builder debian12`")
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    log = settings.work_dir / f"image-{builder}.log"
    ui.info(f"building image {ref} from {ctx} (base {base_name}; log: {log})")
    t0 = time.monotonic()
    echo = (lambda ln: None) if quiet else \
        (lambda ln: print(ln, flush=True) if ln.strip() else None)
    with proc.sigterm_as_interrupt():
        _stream_build(client, ctx, ref, {**(buildargs or {}), "BASE": base_name}, log,
                      nocache=force, echo=echo)
    img = find_image(client, ref)
    if img is None:
        raise DockerError(f"docker build finished but {ref} does not exist", hint=f"see {log}")
    img.tag(repo, "latest")
    ui.info(f"[green]built[/green] {ref} ({img.id[:19]}) in {time.monotonic() - t0:.0f} s")
    return ImageInfo(repo, tag, img.id, False)


def existing_image(settings: Settings, builder: str, client: Any) -> ImageInfo | None:
    """The builder image for the current inputs if it exists (never builds)."""
    repo, tag = image_ref(settings, builder, client)
    img = find_image(client, f"{repo}:{tag}")
    return ImageInfo(repo, tag, img.id, True) if img is not None else None


def recipe_image(settings: Settings, recipe: Recipe, builder: str, *, offline: bool = False,
                 client: Any | None = None, quiet: bool = False) -> ImageInfo:
    """The image a recipe builds in with builder (builders.<b>.image, e.g. debian12-kmod, else
    docker/<builder>): made when missing, or DockerError when missing and offline."""
    name = recipe.builder(builder).image or builder
    client = client or docker_client()
    if offline:
        try:
            info = existing_image(settings, name, client)
        except DockerError:
            info = None
        if info is None:
            try:
                ref = ":".join(image_ref(settings, name, client))
            except DockerError:
                ref = repr(name)
            raise DockerError(f"builder image {ref} is missing (and --offline builds no "
                              "images)", hint=f"run `invoke images --builder {name}` (needs the "
                                              "apt mirror), then build again")
        return info
    return ensure_image(settings, name, client=client, quiet=quiet)
