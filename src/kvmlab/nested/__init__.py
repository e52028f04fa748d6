"""Nested KVM lab: a lab VM (the kmod recipe's kernel + a Debian initramfs, under TCG with
emulated SVM) reachable over ssh on 127.0.0.1, in which kvmlab's own steps run."""
