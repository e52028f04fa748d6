"""The lab VM's cost: kernel fetch, rootfs build (cold and cached) and boot to sshd (TCG).

    python3 bench/labvm.py [--repeat N] [--keep-cache DIR]

With an empty cache (a temporary one unless --keep-cache) it times, in one run:
1. ``fetch_kernel``: apt-get download + dpkg-deb -x + depmod (then the cached no-op);
2. ``build_rootfs``: docker image (present or built) + export + module closure + cpio (then the
   cached no-op);
3. ``LabVM.boot`` N times: launch -> sshd answering, the guest's uptime then, and the SVM check;
   plus a ``modprobe kvm_amd`` inside.
Machine load is printed: the 2 cores are shared, so compare within one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from kvmlab.core.settings import load_settings
from kvmlab.nested import kernel as kernel_mod
from kvmlab.nested import rootfs as rootfs_mod
from kvmlab.nested.labvm import LabVM


def timed(fn, *a, **kw):
    t0 = time.monotonic()
    out = fn(*a, **kw)
    return out, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep-cache", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmlab-bench-labvm-") as tmp:
        cache = a.keep_cache or Path(tmp) / "cache"
        s = load_settings({"state_dir": Path(tmp) / "state", "cache": cache})
        print(f"load average: {os.getloadavg()[0]:.2f}")
        release = kernel_mod.recipe_release(s)
        k, t = timed(kernel_mod.fetch_kernel, s, release)
        _, t2 = timed(kernel_mod.fetch_kernel, s, release)
        print(f"fetch_kernel {release} ({k.package_version}): {t:.1f} s, cached {t2:.3f} s")
        r, t = timed(rootfs_mod.build_rootfs, s, k)
        _, t2 = timed(rootfs_mod.build_rootfs, s, k)
        print(f"build_rootfs ({r.size >> 20} MiB, {len(r.modules)} modules): {t:.1f} s, "
              f"cached {t2:.2f} s")
        boots, uptimes, totals = [], [], []
        for _ in range(a.repeat):
            t0 = time.monotonic()
            with LabVM.boot(s, k, r, timeout=300) as vm:
                _, tm = timed(vm.run, "modprobe kvm_amd", timeout=120, check=True)
                boots.append(vm.times.launch_to_sshd)
                uptimes.append(vm.times.guest_uptime)
            totals.append(time.monotonic() - t0)
            print(f"  boot: launch->sshd {boots[-1]:.1f} s (guest uptime {uptimes[-1]:.1f} s), "
                  f"modprobe kvm_amd {tm:.2f} s, whole block {totals[-1]:.1f} s")
        print(f"lab VM boot, median of {a.repeat}: launch->sshd {statistics.median(boots):.1f} s, "
              f"guest uptime {statistics.median(uptimes):.1f} s, "
              f"with SVM check + kill {statistics.median(totals):.1f} s; "
              f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
