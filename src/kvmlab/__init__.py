"""kvmlab: build, install and prove an old qemu-kvm (0.12 era) on today's Linux hosts."""
__version__ = "0.1.0"
