"""The KVM ioctl decoder against numbers computed from the kernel's uapi macros."""
from __future__ import annotations

from kvmlab.host import kvmioctl, trace
from kvmlab.host.kvmapi import _IOC_DIRSHIFT, _IOC_SIZESHIFT


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr, KVMIO = 0xAE
    return direction << _IOC_DIRSHIFT | size << _IOC_SIZESHIFT | 0xAE << 8 | nr


def test_numbers_from_the_uapi_macros():
    n = kvmioctl.NUMBERS
    assert n["KVM_GET_API_VERSION"] == 0xAE00
    assert n["KVM_CREATE_VM"] == 0xAE01
    assert n["KVM_CHECK_EXTENSION"] == 0xAE03
    assert n["KVM_CREATE_VCPU"] == 0xAE41
    assert n["KVM_SET_TSS_ADDR"] == 0xAE47
    assert n["KVM_SET_IDENTITY_MAP_ADDR"] == _ioc(1, 0x48, 8) == 0x4008AE48
    assert n["KVM_CREATE_IRQCHIP"] == 0xAE60
    assert n["KVM_CREATE_PIT"] == 0xAE64
    assert n["KVM_CREATE_PIT2"] == _ioc(1, 0x77, 64) == 0x4040AE77
    assert n["KVM_SET_USER_MEMORY_REGION"] == 0x4020AE46
    assert n["KVM_RUN"] == 0xAE80
    assert n["KVM_GET_REGS"] == _ioc(2, 0x81, 144) == 0x8090AE81
    assert n["KVM_GET_SREGS"] == 0x8138AE83
    assert n["KVM_GET_SUPPORTED_CPUID"] == _ioc(3, 0x05, 8) == 0xC008AE05


def test_same_request_number_on_different_fds_is_told_apart():
    assert kvmioctl.ioctl_name("vm", kvmioctl.NUMBERS["KVM_GET_PIT2"]) == "KVM_GET_PIT2"
    assert kvmioctl.ioctl_name("vcpu", kvmioctl.NUMBERS["KVM_GET_VCPU_EVENTS"]) == \
        "KVM_GET_VCPU_EVENTS"
    assert kvmioctl.NUMBERS["KVM_GET_PIT2"] != kvmioctl.NUMBERS["KVM_GET_VCPU_EVENTS"]


def test_arguments_are_decoded():
    assert kvmioctl.decode("system", 0xAE03, "0xb").argument == "KVM_CAP_PIT"
    assert kvmioctl.decode("system", 0xAE03, "0x19").argument == "KVM_CAP_IRQ_ROUTING"
    assert kvmioctl.decode("system", 0xAE03, "0x3e7").argument == "cap 999"
    assert kvmioctl.decode("vm", 0xAE47, "0xfeffd000").argument == "addr 0xfeffd000"


def test_unknown_numbers_are_shown_raw_not_dropped():
    d = kvmioctl.decode("vm", 0xAEFF, "0x0")
    assert (d.name, d.known) == ("0xaeff", False)
    text = ('100 1.000000 openat(-100</tmp>, "/dev/kvm", 0x2) = 3</dev/kvm<char 10:232>>\n'
            "100 1.000100 ioctl(3</dev/kvm<char 10:232>>, 0xae01, 0) = 4<anon_inode:kvm-vm>\n"
            "100 1.000200 ioctl(4<anon_inode:kvm-vm>, 0xaeff, 0x7) = -1 ENOTTY (Inappropriate)\n"
            '100 1.000300 write(2</dev/pts/0>, "oops\\n", 5) = 5\n')
    ev = trace.parse(text)
    assert [e.name for e in ev] == ["open(/dev/kvm)", "KVM_CREATE_VM", "0xaeff", ""]
    assert ev[2].errno == "ENOTTY" and ev[2].failed and ev[3].text == "oops"


def test_unfinished_and_resumed_calls_are_joined():
    text = ("7 2.0 ioctl(5<anon_inode:kvm-vcpu:0>, 0xae80, 0 <unfinished ...>\n"
            "8 2.1 ioctl(4<anon_inode:kvm-vm>, 0xae60, 0) = 0\n"
            "7 2.5 <... ioctl resumed>) = 0\n")
    ev = trace.parse(text)
    assert [(e.name, e.fd, e.result) for e in ev] == [("KVM_CREATE_IRQCHIP", "vm", 0),
                                                     ("KVM_RUN", "vcpu", 0)]
    assert trace.verdict(["qemu"], ev)["status"] == "kvm-used"


def test_not_requested():
    assert not trace.kvm_requested(["qemu", "-no-kvm"])
    assert not trace.kvm_requested(["qemu", "-accel", "tcg"])
    assert trace.verdict(["qemu", "-accel", "tcg"], [])["status"] == "not-requested"
