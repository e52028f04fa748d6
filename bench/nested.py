"""`invoke nested` with builds and images cached: the split next to a plain TCG boot.

    python3 bench/nested.py [--repeat N]

Needs both builds in the state dir (``invoke build --recipe kvm-kmod-6.1`` and the qemu-kvm
0.12.1.2 build; KVMLAB_STATE_DIR/KVMLAB_CACHE as for any task). One warm-up run makes the
kernel, the labvm image and the rootfs (not timed); then N runs of ``run_nested`` give the split
(lab VM boot, push, module load, doctor, install, nested boot, verify, total), and N plain TCG
boots of the same tiny guest with the same qemu-kvm 0.12 build on this host (``boot-test
--accel tcg``, the whole call) are the reference. Printed as seconds and as ratios to the plain
boot. The 2 cores are shared with other work: compare figures from one run only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from kvmlab.boot import vm as boot_vm
from kvmlab.core.settings import load_settings
from kvmlab.nested import steps as nested_steps
from kvmlab.nested.record import NestedOptions

PARTS = ("lab_vm_boot", "push", "module_load", "doctor", "install", "nested_boot", "verify",
         "total")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    s = load_settings()
    o = NestedOptions()
    print(f"load average {os.getloadavg()[0]:.2f}; warm-up run (kernel, image, rootfs) ...")
    nested_steps.run_nested(s, o)
    runs, walls = [], []
    for _ in range(a.repeat):
        t0 = time.monotonic()
        rec = nested_steps.run_nested(s, o)
        walls.append(time.monotonic() - t0)
        runs.append(rec)
        print("  " + ", ".join(f"{p} {getattr(rec.times, p):.1f}" for p in PARTS) +
              f"; {rec.kvm_exits} KVM exits; wall {walls[-1]:.1f} s")
    qemu = s.out(o.qemu_recipe, o.builder) / "bin" / "qemu-system-x86_64"
    plain = []
    for _ in range(a.repeat):
        r = boot_vm.boot_test(s, qemu=qemu, accel="tcg", guest="tiny")
        assert r.booted, r.failure
        plain.append(r.wall_seconds)
    ref = statistics.median(plain)
    print(f"plain TCG boot of the tiny guest on this host (qemu-kvm 0.12, whole call): "
          f"{ref:.2f} s (median of {a.repeat})")
    for p in PARTS:
        v = statistics.median(getattr(r.times, p) for r in runs)
        print(f"  {p:12s} {v:6.1f} s  = {v / ref:6.1f} x the plain TCG boot")
    nb = statistics.median(r.nested_seconds or 0 for r in runs)
    print(f"  nested boot launch->marker inside: {nb:.2f} s = {nb / ref:.1f} x; "
          f"invoke nested wall {statistics.median(walls):.1f} s (goal <= 60 s); "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
