"""What a failing KVM call means and what to check next: facts, each with where it comes from.

``explain(name, errno_name)`` gives the meaning and the next step for the first KVM call that
failed in a trace (kvmlab.host.trace). The rows come from the kernel's KVM code
(arch/x86/kvm/x86.c ``kvm_arch_vm_ioctl``, virt/kvm/kvm_main.c) and from qemu-kvm 0.12's
KVM start (qemu-kvm.c ``kvm_create`` -> qemu-kvm-x86.c ``kvm_arch_create`` ->
``kvm_init_tss`` / ``kvm_init_identity_map_page`` / ``kvm_create_pit``, then
qemu-kvm.c ``kvm_create_irqchip``), measured on these hosts (shared/FACTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    meaning: str
    check_next: str


_PIT_ENOENT = Fact(
    "the host kernel refused to create the in-kernel PIT: its KVM (arch/x86/kvm/x86.c, "
    "KVM_CREATE_PIT/KVM_CREATE_PIT2) returns ENOENT unless an in-kernel PIC exists, i.e. "
    "KVM_CREATE_IRQCHIP must come first; qemu-kvm 0.12 creates the PIT in kvm_arch_create, "
    "before kvm_create_irqchip, prints \"Create kernel PIC irqchip failed\" and gives KVM up "
    "(\"Could not initialize KVM, will disable KVM support\": the guest then runs under TCG)",
    "run it with -no-kvm-irqchip (0.12 then creates neither PIC nor PIT in the kernel, so the "
    "call is not made), or on a host kernel whose KVM accepts a PIT before the irqchip (the "
    "nested lab's 6.1 kernel with kvm-amd initialises KVM for this binary); a paravirtual KVM "
    "(kvm_pvm, as on these machines) runs no unmodified guest either way: `invoke doctor`")

FACTS: dict[tuple[str, str], Fact] = {
    ("KVM_CREATE_PIT", "ENOENT"): _PIT_ENOENT,
    ("KVM_CREATE_PIT2", "ENOENT"): _PIT_ENOENT,
    ("KVM_CREATE_PIT", "EEXIST"): Fact(
        "a PIT already exists in this VM", "the caller created it twice; a qemu bug, not the host"),
    ("KVM_CREATE_IRQCHIP", "EEXIST"): Fact(
        "the in-kernel irqchip already exists (or vCPUs were created first)",
        "KVM_CREATE_IRQCHIP must come before KVM_CREATE_VCPU"),
    ("KVM_CREATE_IRQCHIP", "EINVAL"): Fact(
        "this KVM has no in-kernel irqchip for this VM type",
        "run qemu with -no-kvm-irqchip (0.12) / -machine kernel-irqchip=off"),
    ("KVM_CREATE_VM", "EINVAL"): Fact(
        "the kernel refused the VM type (or KVM is not usable: no VMX/SVM for this KVM)",
        "`invoke doctor` (CPU flags, kvm modules, /dev/kvm probe)"),
    ("KVM_CREATE_VM", "ENOMEM"): Fact("the kernel could not allocate the VM",
                                      "free memory on the host"),
    ("KVM_CREATE_VCPU", "EINVAL"): Fact(
        "the vCPU id is out of range or KVM refuses more vCPUs",
        "fewer -smp CPUs; KVM_CHECK_EXTENSION(KVM_CAP_MAX_VCPUS) says the limit"),
    ("KVM_CREATE_VCPU", "EEXIST"): Fact("a vCPU with this id exists already", "a qemu bug"),
    ("KVM_SET_TSS_ADDR", "EINVAL"): Fact(
        "the TSS address is not usable (it must lie below 4 GiB, three pages, not in guest RAM)",
        "another -m size, or a newer qemu"),
    ("KVM_SET_IDENTITY_MAP_ADDR", "EEXIST"): Fact(
        "the identity map was set after vCPUs were created", "a qemu ordering bug"),
    ("KVM_SET_USER_MEMORY_REGION", "EINVAL"): Fact(
        "the memory slot is misaligned, overlaps another slot, or exceeds KVM's slot count",
        "another -m size; KVM_CAP_NR_MEMSLOTS says how many slots KVM has"),
    ("KVM_RUN", "EFAULT"): Fact("the guest touched memory KVM could not map",
                                "check -m and the memory slots before KVM_RUN"),
}

_BY_ERRNO: dict[str, Fact] = {
    "EACCES": Fact("permission denied", "run as root or join the kvm group (ls -l /dev/kvm)"),
    "EPERM": Fact("operation not permitted", "run as root, or check seccomp/lockdown"),
    "ENOENT": Fact("the kernel says a prerequisite object does not exist",
                   "look at the calls before this one in the trace"),
    "ENXIO": Fact("the device behind the call does not exist (no such irqchip/device)",
                  "an in-kernel irqchip must be created first"),
    "EINVAL": Fact("the kernel refused the argument", "compare the argument with kvm.h"),
    "ENOTTY": Fact("this KVM does not know the ioctl (too old, or not built in)",
                   "KVM_CHECK_EXTENSION for its capability; a newer host kernel"),
    "EEXIST": Fact("the object exists already", "the caller made the same call twice"),
    "ENOMEM": Fact("the kernel ran out of memory", "free memory on the host"),
    "EBUSY": Fact("KVM is busy (another hypervisor holds VMX/SVM?)",
                  "stop other hypervisors (VirtualBox, VMware) on the host"),
}

OPEN_FACTS: dict[str, Fact] = {
    "ENOENT": Fact("/dev/kvm does not exist: no KVM in this kernel (or not loaded)",
                   "`invoke load-modules`, then `invoke doctor`"),
    "EACCES": Fact("/dev/kvm is not accessible to this user",
                   "run as root or add the user to the kvm group"),
    "ENXIO": Fact("/dev/kvm exists but no KVM driver answers it",
                  "`invoke load-modules` (kvm_intel / kvm_amd)"),
    "ENODEV": Fact("/dev/kvm exists but no KVM driver answers it",
                   "`invoke load-modules` (kvm_intel / kvm_amd)"),
}


def explain(name: str, errno_name: str) -> Fact:
    """The meaning of ``name`` failing with ``errno_name`` and what to check next."""
    f = FACTS.get((name, errno_name)) or _BY_ERRNO.get(errno_name)
    if f is not None:
        return f
    return Fact(f"{name} failed with {errno_name}",
                "look at the calls before it and at include/uapi/linux/kvm.h")


def explain_open(errno_name: str) -> Fact:
    return OPEN_FACTS.get(errno_name) or Fact(f"opening /dev/kvm failed with {errno_name}",
                                              "`invoke doctor`")
