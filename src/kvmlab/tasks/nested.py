"""nested task: kvmlab's own steps inside a lab VM with emulated SVM (kvmlab.nested.steps)."""
from __future__ import annotations

from invoke import Context

from kvmlab.core import ui
from kvmlab.nested import steps as nested_mod
from kvmlab.nested.record import DEFAULT_TIMEOUT, NestedOptions, NestedRecord

from ._common import settings, task


@task(help={"recipe": "the kmod recipe whose modules are loaded (its target kernel boots)",
            "qemu_recipe": "the qemu-kvm recipe whose build boots the guest under KVM inside",
            "builder": "builder of both builds",
            "modules": "built (the .ko files of `invoke build --recipe RECIPE`) or distro "
                       "(the kernel package's own)",
            "cpu": "the lab VM's -cpu model (max: TCG emulates AMD SVM)",
            "timeout": "seconds for the whole run, lab VM boot included",
            "keep": "leave the lab VM running and print the ssh command",
            "json": "print the record as JSON"})
def nested(ctx: Context, recipe: str = "kvm-kmod-6.1", qemu_recipe: str = "qemu-kvm-0.12.1.2",
           builder: str = "debian12", modules: str = "built", cpu: str = "max",
           timeout: float = 0, keep: bool = False, json_: bool = False) -> None:
    """Boot a lab VM under TCG with SVM; inside, load-modules, doctor, boot-test --accel kvm."""
    s = settings(ctx, recipe=recipe)
    settings(ctx, recipe=qemu_recipe, builder=builder)   # both recipes checked before anything
    opts = NestedOptions(recipe=recipe, qemu_recipe=qemu_recipe, builder=builder,
                         modules=modules, cpu=cpu, timeout=timeout or DEFAULT_TIMEOUT, keep=keep)
    with ui.console.status("nested") as status:
        rec = nested_mod.run_nested(s, opts, lambda st: status.update(f"nested: {st} ..."))
    if json_:
        ui.emit_json(rec.to_dict())
        return
    show(rec)


nested.help["json_"] = nested.help.pop("json")


def show(rec: NestedRecord) -> None:
    """The record as a table and the lines a user looks for."""
    t = rec.times
    mods = ", ".join(f"{m.name} ({m.source})" for m in rec.modules)
    ui.table("nested KVM lab", ["what", "value"], [
        ("lab VM kernel", f"{rec.kernel.get('release')} ({rec.kernel.get('package_version')})"),
        ("lab VM CPU", f"{rec.cpu.get('vendor')} -cpu {rec.cpu.get('model')}: "
                       f"svm={rec.cpu.get('svm')} vmx={rec.cpu.get('vmx')}"),
        ("modules loaded", mods),
        ("vermagic", "; ".join(sorted({m.vermagic for m in rec.modules if m.source == "built"}))),
        ("doctor inside", rec.verdict),
        ("KVM backend", rec.backend),
        ("nested boot", f"{rec.qemu_version}: accel {rec.accel}, {rec.kvm_exits} KVM exits, "
                        f"marker after {rec.nested_seconds or 0:.2f} s"),
        ("checks", ", ".join(f"{k} {v}" for k, v in rec.verified.items())),
        ("times", f"lab VM boot {t.lab_vm_boot:.1f} s, push {t.push:.1f} s, module load "
                  f"{t.module_load:.1f} s, doctor {t.doctor:.1f} s, install {t.install:.1f} s, "
                  f"nested boot {t.nested_boot:.1f} s, verify {t.verify:.1f} s, "
                  f"total {t.total:.1f} s"),
    ])
    ui.info(f"kernel log: {rec.dmesg}")
    ui.info(f"record: {rec.run_dir}/record.json")
    if rec.ssh:
        ui.info(f"lab VM kept running; get in with: {rec.ssh}")
