"""Benchmark: a no-op `invoke fetch` + `invoke patch` (nothing changed) vs `invoke --list`.

    python3 bench/noop.py [--rounds 5]

Sets up a throw-away project (the fake qemu tree from tests/support, a file:// mirror, a
two-patch series), runs fetch + patch once for real, then times the no-op runs, with and without
the testinfra checks each task runs at its end. Goal: fetch + patch no-op < 1 s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from support.fakeqemu import make_fake_home, tree_files  # noqa: E402
from support.pipeline import make_patch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvmlab-bench-noop-"))
    try:
        files = tree_files()
        version, kvm = files["VERSION"][0].decode(), files["KVM_VERSION"][0].decode()
        env = make_fake_home(tmp, patches={
            "0001-version.patch": make_patch("VERSION", version, version.strip() + "-b\n"),
            "0002-kvm-version.patch": make_patch("KVM_VERSION", kvm, kvm.strip() + "-b\n")})
        env = {**os.environ, **env, "KVMLAB_STATE_DIR": str(tmp / "state"),
               "KVMLAB_CACHE": str(tmp / "cache"), "KVMLAB_LOCK": str(tmp / "state" / "lock"),
               "KVMLAB_HOME": str(REPO)}

        def inv(*a: str) -> float:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "invoke", *a], cwd=REPO, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
            return time.perf_counter() - t

        inv("patch")  # the real work, once
        rows = {"invoke --list": [], "fetch + patch (no-op)": [],
                "fetch + patch --no-verify (no-op)": []}
        for _ in range(args.rounds):
            rows["invoke --list"].append(inv("--list"))
            rows["fetch + patch (no-op)"].append(inv("fetch") + inv("patch"))
            rows["fetch + patch --no-verify (no-op)"].append(
                inv("fetch", "--no-verify") + inv("patch", "--no-verify"))
        base = statistics.median(rows["invoke --list"])
        print(f"median of {args.rounds} (load average {os.getloadavg()[0]:.1f}):")
        for name, times in rows.items():
            med = statistics.median(times)
            print(f"  {name:36s} {med:6.2f} s  {med / base:5.1f}x invoke --list")
        verify_cost = (statistics.median(rows["fetch + patch (no-op)"]) -
                       statistics.median(rows["fetch + patch --no-verify (no-op)"])) / 2
        print(f"  testinfra checks per task (run_step_checks): ~{verify_cost:.2f} s")
        print("goal: fetch + patch no-op < 1 s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
