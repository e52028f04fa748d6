#!/usr/bin/env python3
"""Lab benchmarks, as ratios measured in the same run.

1. A second, no-op `invoke lab` vs `invoke --list` (goal < 3x).
2. Host-side steps on 3 hosts vs 1 host (containers with sshd on 127.0.0.1; goal < 1.5x: they
   really run in parallel).
Uses the generated fake qemu-like tree, the debian12 builder and the distribution's qemu for the
boot-test (the fake binary boots nothing). Needs dockerd; run after `.ci/setup`.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.fakeqemu import make_fake_home, make_fake_qemu_tarball  # noqa: E402
from support.labhosts import lab_hosts  # noqa: E402


def timed(args: list[str], env: dict, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=1800)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            sys.exit(f"`invoke {' '.join(args)}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kvmlab-bench-lab-"))
    try:
        env = dict(os.environ, KVMLAB_STATE_DIR=str(tmp / "state"), KVMLAB_CACHE=str(tmp / "cache"),
                   KVMLAB_LOCK=str(tmp / "state" / "kvmlab.lock"), KVMLAB_HOME=str(REPO))
        env.update(make_fake_home(tmp / "home", tarball=make_fake_qemu_tarball(tmp / "dist")))
        qemu = shutil.which("qemu-system-x86_64")
        lab = ["lab", "--builder", "debian12", "--prefix", str(tmp / "prefix"), "--guest", "tiny",
               "--no-verify"] + (["--qemu", qemu] if qemu else ["--skip", "boot-test"])
        timed(lab, env, runs=1)  # cold run: builds everything
        t_list = timed(["--list"], env, runs=5)
        t_lab = timed(lab, env, runs=3)
        print(f"no-op lab: {t_lab:.2f}s, invoke --list: {t_list:.2f}s, "
              f"ratio {t_lab / t_list:.2f}x (goal < 3x)")

        os.environ.update(env)
        from kvmlab.core.settings import load_settings
        settings = load_settings()
        hostlab = ["lab", "--builder", "debian12", "--prefix", "/opt/kvmlab",
                   "--skip", "create-image,guest,boot-test", "--accept-new-host-keys"]
        with lab_hosts(settings, 3, tmp) as hosts:
            t1 = timed(hostlab + ["--hosts", str(hosts.inventory(tmp / "h1.txt", 1))], env, runs=3)
            t3 = timed(hostlab + ["--hosts", str(hosts.inventory(tmp / "h3.txt", 3))], env, runs=3)
        print(f"host-side steps: 1 host {t1:.2f}s, 3 hosts {t3:.2f}s, ratio {t3 / t1:.2f}x "
              f"(goal < 1.5x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
