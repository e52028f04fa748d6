"""qemu: what a qemu binary is and can do, its monitor, a headless launch."""
