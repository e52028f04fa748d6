"""create-image, guest and boot-test tasks."""
from __future__ import annotations

import shlex
from typing import Any

from invoke import Context

from kvmlab.boot import dryrun, vm
from kvmlab.boot import guest as guest_mod
from kvmlab.boot.bootsector import boot_sector_listing
from kvmlab.boot.image import create_image as create
from kvmlab.boot.image import human_size
from kvmlab.core import ui
from kvmlab.core.errors import VMError
from kvmlab.core.fsutil import sha256_file
from kvmlab.core.settings import Settings

from ._common import run_step_checks, settings, task


@task(help={"path": "where to create the image",
            "size": "virtual size, e.g. 10G, 512M (binary units)",
            "format": "qcow2 or raw",
            "force": "replace an existing file",
            "qemu_img": "qemu-img to use (default: installed build, else PATH)",
            "no_verify": "skip the testinfra checks of the image afterwards"})
def create_image(ctx: Context, path: str, size: str = "10G", format: str = "qcow2",
                 force: bool = False, qemu_img: str = "", no_verify: bool = False,
                 json_: bool = False) -> None:
    """Create a disk image with qemu-img (refuses to overwrite without --force)."""
    s = settings(ctx)
    r = create(path, size, format, qemu_img=qemu_img or None, force=force, settings=s)
    ui.table("disk image", ["path", "format", "virtual size", "qemu-img", "status"],
             [(r.path, r.format, f"{human_size(r.virtual_size)} ({r.virtual_size} bytes)",
               r.qemu_img, "ok")])
    checked = run_step_checks(s, "boot", no_verify, extra_env={
        "KVMLAB_VERIFY_IMAGE": str(r.path), "KVMLAB_VERIFY_IMAGE_SIZE": str(r.virtual_size),
        "KVMLAB_VERIFY_IMAGE_FORMAT": r.format, "KVMLAB_VERIFY_IMAGE_QEMU_IMG": str(r.qemu_img),
        "KVMLAB_VERIFY_RESULTS": ""})
    if json_:
        ui.emit_json({"path": str(r.path), "format": r.format, "virtual_size": r.virtual_size,
                      "qemu_img": str(r.qemu_img), "verify": checked})


@task(help={"kind": "tiny, linux or iso (default: all three)",
            "kernel": "kernel for linux/iso (default: newest /boot/vmlinuz-*)",
            "init": "file whose contents replace the linux guest's /init (testing)",
            "force": "rebuild even when cached",
            "listing": "print the tiny boot sector's instructions"})
def guest(ctx: Context, kind: str = "", kernel: str = "", init: str = "", force: bool = False,
          listing: bool = False, json_: bool = False) -> None:
    """Make (or show the cached) test guests."""
    s = settings(ctx)
    init_script = _read_init(init)
    rows = []
    docs = []
    for k in ([kind] if kind else list(guest_mod.KINDS)):
        gu = guest_mod.make_guest(s, k, kernel=kernel or None, init_script=init_script, force=force)
        files = [p for p in (gu.disk, gu.kernel, gu.vmlinux, gu.initrd, gu.iso) if p]
        size = sum(p.stat().st_size for p in files)
        status = "cached" if gu.cached else "built"
        rows.append((k, gu.dir, ", ".join(p.name for p in files), f"{size / 1e6:.1f} MB", status))
        if json_:
            docs.append({"kind": k, "dir": str(gu.dir), "status": status, "size": size,
                         "cmdline": gu.cmdline or None,
                         "files": [{"path": str(p), "size": p.stat().st_size,
                                    "sha256": sha256_file(p)} for p in files]})
    ui.table("test guests", ["kind", "directory", "files", "size", "status"], rows)
    text = boot_sector_listing() if listing else None
    if text:
        ui.info(text)
    if json_:
        ui.emit_json({"guests": docs, "listing": text})


def _read_init(path: str) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise VMError(f"cannot read --init {path}: {e.strerror}") from None


@task(help={"qemu": "qemu-system-x86_64 to boot with (default: installed build, else PATH)",
            "accel": "auto (KVM if the host probe says it works, else TCG), kvm or tcg",
            "guest": "tiny, linux or iso (default: tiny then linux)",
            "iso": "boot this installer ISO (e.g. CentOS 6.10 minimal) to its boot loader: passes "
                   "when a loader banner shows on serial or the El Torito boot image is in guest "
                   "memory at its load address (monitor `xp`); a screendump is kept",
            "kernel": "kernel for the linux/iso guest",
            "disk": "disk image to attach (default: a fresh 1G qcow2 per run)",
            "timeout": "seconds to wait for the marker (default: per guest)",
            "memory": "guest RAM in MiB",
            "init": "file replacing the linux guest's /init (testing)",
            "dry_run": "print a qemu command line to paste (serial console on the terminal, "
                       "cached guest files opened read-only) and stop; writes nothing",
            "show_command": "print the qemu command line(s), then boot",
            "no_verify": "skip the testinfra checks afterwards"})
def boot_test(ctx: Context, qemu: str = "", accel: str = "auto", guest: str = "", iso: str = "",
              kernel: str = "", disk: str = "", timeout: float = 0.0, memory: int = 256,
              init: str = "", dry_run: bool = False, show_command: bool = False,
              no_verify: bool = False, json_: bool = False) -> None:
    """Boot test guests headless with qemu; report booted, accelerator, time to marker."""
    s = settings(ctx)
    init_script = _read_init(init)
    if iso:
        guests = ["user-iso"]
    elif guest:
        guests = [x for x in guest.split(",") if x]
    else:
        guests = ["tiny", "linux"]
    if dry_run:
        _dry_run(s, guests, qemu=qemu, accel=accel, iso=iso, kernel=kernel, disk=disk,
                 memory=memory, init_script=init_script, as_json=json_)
        return
    results: list[vm.BootResult] = []
    for g in guests:
        r = vm.boot_test(s, qemu=qemu or None, accel=accel, guest=g if g != "user-iso" else "tiny",
                         iso=iso or None, kernel=kernel or None, disk=disk or None,
                         timeout=timeout or None, memory=memory, init_script=init_script)
        if show_command:
            ui.info(shlex.join(r.command))
        if not results:
            ui.info(f"accelerator: {r.accel} ({r.accel_reason})")
        results.append(r)
        if not r.booted:
            break
    _show_boots(results, json_)
    last = vm.write_last(s, results)
    doc: dict[str, Any] = {"results": [r.to_dict() for r in results], "last_boot": str(last)}
    bad = [r for r in results if not r.booted]
    if bad:
        r = bad[0]
        ui.info(f"[dim]serial log {r.serial_log}, last lines:[/dim]")
        ui.info(r.serial_tail())
        raise VMError(f"{r.guest} guest did not boot: {r.failure}",
                      hint=f"serial log kept in {r.serial_log}; command in {r.run_dir}/command.txt"
                      ).with_report(doc)
    # the record names the qemu-img of each run's disk (disk_qemu_img): the checks use that one
    doc["verify"] = run_step_checks(s, "boot", no_verify, extra_env={
        "KVMLAB_VERIFY_RESULTS": str(last), "KVMLAB_VERIFY_IMAGE": "",
        "KVMLAB_VERIFY_IMAGE_QEMU_IMG": ""})
    if json_:
        ui.emit_json(doc)


def _dry_run(s: Settings, guests: list[str], *, qemu: str, accel: str, iso: str, kernel: str,
             disk: str, memory: int, init_script: str | None, as_json: bool) -> None:
    """One pasteable command per guest on stdout (or the JSON list); nothing is written."""
    cmds = []
    for g in guests:
        cmds.append(dryrun.command(s, qemu=qemu or None, accel=accel,
                                   guest=g if g != "user-iso" else "tiny", iso=iso or None,
                                   kernel=kernel or None, disk=disk or None, memory=memory,
                                   init_script=init_script))
    if as_json:
        pairs = zip(guests, cmds, strict=True)
        ui.emit_json({"dry_run": True, "commands": [
            {"guest": g, "argv": c, "command": shlex.join(c)} for g, c in pairs]})
        return
    for c in cmds:
        print(shlex.join(c), flush=True)
    ui.warn("dry run: nothing was written or started; the command boots the cached guest "
            "interactively (serial console here, snapshot=on); Ctrl-C ends it")


def _show_boots(results: list[vm.BootResult], as_json: bool) -> None:
    if as_json:
        return
    rows = []
    for r in results:
        secs = f"{r.seconds:.2f}" if r.seconds is not None else "-"
        facts = r.facts
        detail = r.evidence or (f"kernel {facts.get('kernel')}, clocksource "
                                f"{facts.get('clocksource')}, uptime {facts.get('uptime')} s"
                                if facts else "")
        if r.kvm_exits is not None:
            detail += f"; {r.kvm_exits} KVM exits"
        rows.append((r.guest, r.qemu_version, r.accel, "yes" if r.booted else "fail", secs,
                     "; ".join(r.warnings) or "-", detail))
    ui.table("boot-test", ["guest", "qemu", "accel", "booted", "seconds", "warnings", "detail"],
             rows, status_col="booted")
