"""doctor, load-modules and explain-exit tasks."""
from __future__ import annotations

from invoke import Context

from kvmlab.build.kmodules import modules_from
from kvmlab.core import ui
from kvmlab.core.errors import HostError
from kvmlab.host import doctor as host
from kvmlab.host import verdict

from ._common import describe_os_error, run_step_checks, settings, task


@task(help={"json": "print the report as JSON instead of a table",
            "timeout": "seconds the probe guest may take before it is killed",
            "strict": "exit 1 when the verdict says KVM cannot run guests (default); "
                      "--no-strict only reports"})
def doctor(ctx: Context, json_: bool = False, timeout: float = 10, strict: bool = True) -> None:
    """Check CPU, firmware, kvm modules and /dev/kvm, then run a probe guest; give a verdict.

    Exits 1 when KVM cannot run guests here (--no-strict: exit 0 and only report). The verdict
    is recorded in <state>/host/last-doctor.json for `status`."""
    rep = host.doctor(timeout=timeout)
    doc = {**rep.to_dict(), "record": _record(ctx, rep)}
    if not json_:
        rows = []
        for c in rep.checks:
            text = c.explanation + (f"\nfix: {c.hint}" if c.hint else "")
            rows.append((c.name, c.shown_status, c.value, text))
        ui.table("host doctor", ["check", "status", "value", "explanation / fix"], rows)
        colour = "green" if rep.usable else "red"
        ui.info(f"verdict: [bold {colour}]{rep.verdict}[/bold {colour}]")
    if rep.usable or not strict:
        if json_:
            ui.emit_json(doc)
        return
    fix = next((c.hint for c in rep.checks if c.status in ("fail", "error") and c.hint), None)
    raise HostError(f"KVM cannot run guests here: {rep.verdict}",
                    hint=(fix + "; " if fix else "") + "--no-strict reports without failing"
                    ).with_report(doc if json_ else {})


# invoke turns a parameter named json_ into --json
doctor.help["json_"] = doctor.help.pop("json")


def _record(ctx: Context, rep: host.DoctorReport) -> str | None:
    """The verdict for `status`; a state dir that cannot be written only costs a warning."""
    s = settings(ctx)
    try:
        return str(verdict.write_record(s.state_dir, rep, "doctor"))
    except OSError as e:
        message, hint = describe_os_error(e, s)
        ui.warn(f"the verdict was not recorded for `status`: {message} ({hint})")
        return None


@task(help={"ko": "comma-separated .ko files to insmod (kvm.ko first) instead of modprobe",
            "from": "the out/ directory of a kmod build (invoke build --recipe kvm-kmod-6.1)",
            "unload": "rmmod the modules instead (refused while VMs use KVM)",
            "json": "print the result as JSON",
            "no-verify": "skip the host checks (kvmlab/checks/test_host.py) after loading"})
def load_modules(ctx: Context, ko: str = "", from_: str = "", unload: bool = False,
                 json_: bool = False, no_verify: bool = False) -> None:
    """Load kvm + kvm_intel/kvm_amd for this CPU (idempotent, built-in aware); --unload."""
    paths = [p for p in ko.split(",") if p]
    if from_:
        paths += [str(p) for p in modules_from(from_)]
    if unload and paths:
        raise HostError("--ko and --unload do not go together")
    res = host.load_modules(paths, unload=unload)
    if json_:
        ui.emit_json(res.to_dict())
    else:
        for a in res.actions:
            ui.info(a)
        ui.table("kvm modules", ["module", "status", "state"],
                 [(n, "ok" if st in ("loaded", "built-in") else "warn", st)
                  for n, st in res.state.items()])
    if not unload:
        run_step_checks(settings(ctx), "load-modules", no_verify or json_)


load_modules.help["json_"] = load_modules.help.pop("json")
load_modules.help["from_"] = load_modules.help.pop("from")


@task(positional=["code"],
      help={"code": "VM-exit reason (hex 0x80000022 or decimal), KVM_EXIT_* number or name, "
                    "or qemu's message text in quotes",
            "kind": "auto (default), vmx, svm, kvm-exit or suberror",
            "json": "print the explanation as JSON"})
def explain_exit(ctx: Context, code: str | None = None, kind: str = "auto",
                 json_: bool = False) -> None:
    """Explain a VM-exit reason / VM-entry failure, a KVM_EXIT_* code or a KVM internal error."""
    e = host.explain_exit(code or "", kind)
    if json_:
        ui.emit_json(e.to_dict())
        return
    if e.kind == "qemu":
        ui.info(f"[bold]{e.name}[/bold]  (qemu message)")
    else:
        ui.info(f"[bold]{e.name}[/bold]  ({e.kind} code {e.code:#x} = {e.code})")
    ui.info(f"meaning: {e.meaning}")
    for d in e.details:
        ui.info(f"  - {d}")
    ui.info(f"check next: {e.next_steps}")


explain_exit.help["json_"] = explain_exit.help.pop("json")
