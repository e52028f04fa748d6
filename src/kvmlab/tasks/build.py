"""images, build and clean tasks."""
from __future__ import annotations

from typing import Any

from invoke import Context

from kvmlab.build import images as images_mod
from kvmlab.build import qemu as build_mod
from kvmlab.core import ui
from kvmlab.core.errors import ConfigError, DockerError

from ._common import run_step_checks, settings, task


@task(help={"builder": "an image under docker/ (debian12, centos6, ...), or all "
                       "(default: the configured builder)",
            "force": "rebuild the image(s) even if their inputs are unchanged"})
def images(ctx: Context, builder: str = "", force: bool = False, json_: bool = False) -> None:
    """Build the builder images (tagged by input hash; no-op when unchanged).

    debian12: a local debootstrap base from the host's apt mirror, no registry needed.
    centos6: needs a local centos:6 image (`docker load -i centos6.tar`); never pulled.
    """
    s = settings(ctx)
    names = images_mod.IMAGE_BUILDERS if builder == "all" else (builder or s.builder,)
    for name in names:
        if not (s.docker_dir / name / "Dockerfile").is_file():
            known = sorted(p.parent.name for p in s.docker_dir.glob("*/Dockerfile"))
            raise ConfigError(f"unknown image builder {name!r} "
                              f"(no {s.docker_dir / name}/Dockerfile)",
                              hint="choose from: " + ", ".join(known))
    client = images_mod.docker_client()
    rows = []
    docs: list[dict[str, Any]] = []
    for name in names:
        external = images_mod.local_base_name(s.docker_dir / name / "Dockerfile") is None
        try:
            info = images_mod.ensure_image(s, name, force=force, client=client)
        except DockerError as e:
            # "all" goes on past an image whose external base (centos:6) is not loaded here
            if builder != "all" or not external:
                raise
            ui.warn(f"{name}: {e.message}; hint: {e.hint}")
            rows.append((name, "-", "skipped", e.message))
            docs.append({"builder": name, "image": None, "status": "skipped", "id": None,
                         "reason": e.message, "hint": e.hint})
            continue
        status = "no-op" if info.noop else "built"
        rows.append((name, info.ref, status, info.id[:19]))
        docs.append({"builder": name, "image": info.ref, "status": status, "id": info.id,
                     "tag": info.tag})
    ui.table("builder images", ["builder", "image", "status", "id"], rows)
    if json_:
        ui.emit_json({"images": docs})


@task(help={"recipe": "recipe name or path (default from settings)",
            "builder": "debian12, centos6 or native (host toolchain)",
            "jobs": "parallel make jobs", "force": "rebuild even if the inputs are unchanged",
            "source": "use this local tarball or directory instead of fetching",
            "offline": "no network: use only cached sources and existing images",
            "no-verify": "skip the testinfra checks after the build",
            "flavour": "release (default) or debug: -O0 -g, unstripped, in "
                       "out/<recipe>/<builder>-debug/ (for trace-kvm --gdb)"})
def build(ctx: Context, recipe: str = "", builder: str = "", jobs: int = 2, force: bool = False,
          source: str = "", offline: bool = False, no_verify: bool = False,
          flavour: str = "release", json_: bool = False) -> None:
    """Configure + make the patched source in a builder container (or natively).

    Artifacts and manifest.json go to out/<recipe>/<builder>/ (--flavour debug:
    out/<recipe>/<builder>-debug/); unchanged inputs are a no-op.
    """
    s = settings(ctx, recipe=recipe, builder=builder)
    res = build_mod.build(s, s.recipe, s.builder, jobs=jobs, force=force,
                          source=source or None, offline=offline, debug=flavour == "debug")
    m = res.manifest
    rows = [(a["path"], a["kind"], a["size"], a["sha256"][:16]) for a in m.get("artifacts", [])]
    if not json_:
        ui.table(f"{m.get('recipe')} ({m.get('builder')}): {res.out_dir}",
                 ["artifact", "kind", "size", "sha256"], rows, status_col=None)
    if m.get("compiler") and not json_:
        datadir = (m.get("config") or {}).get("datadir")
        ui.info(f"compiler: {m['compiler']}" +
                (f"; firmware dir compiled in: {datadir}" if datadir else ""))
    # the build checks look at the release layout (out/<recipe>/<builder>/)
    checked = run_step_checks(s, "kmod" if m.get("kind") == "kmod" else "build",
                              no_verify or flavour == "debug")
    if json_:
        ui.emit_json({**res.to_dict(), "manifest_path": str(res.out_dir / "manifest.json"),
                      "verify": checked})


@task(help={"recipe": "recipe name (default from settings)",
            "builder": "builder whose build tree and outputs are removed",
            "all": "also remove work/<recipe> entirely (the unpacked source)"})
def clean(ctx: Context, recipe: str = "", builder: str = "", all: bool = False,
          json_: bool = False) -> None:
    """Remove a recipe's build tree, build log and out/ for a builder.

    The download cache and the ccache volume are kept (--all also removes work/<recipe>).
    """
    s = settings(ctx, recipe=recipe, builder=builder)
    removed = build_mod.clean(s, s.recipe, s.builder, all_work=all)
    if not removed:
        ui.info(f"nothing to clean for {s.recipe} ({s.builder})")
    for p in removed:
        ui.info(f"removed {p}")
    if json_:
        ui.emit_json({"recipe": s.recipe, "builder": s.builder, "all": all,
                      "removed": [str(p) for p in removed]})
