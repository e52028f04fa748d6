#!/usr/bin/env python3
"""Benchmarks for the host step (baselines measured in the same run; prints ratios).

H1  probe_kvm() wall time vs its irreducible part: starting the child interpreter
    (`python3 -c "import kvmlab.host.kvmapi"`) - the probe's own ioctls and guests are the rest.
H2  doctor() (all checks + probe) vs probe_kvm() alone.
H3  `invoke doctor --json` as a command vs doctor() in-process (invoke + rich start-up).

    python3 bench/host.py [--repeat N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from kvmlab import host  # noqa: E402


def timed(fn, repeat: int) -> float:
    xs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def child() -> None:
        subprocess.run([sys.executable, "-c", "import kvmlab.host.kvmapi"], env=env, check=True,
                       timeout=60)

    def cli() -> None:
        subprocess.run([sys.executable, "-m", "invoke", "doctor", "--json", "--no-strict"], cwd=REPO, env=env,
                       check=True, timeout=120, capture_output=True)

    base = timed(child, a.repeat)
    probe = timed(lambda: host.probe_kvm(timeout=20), a.repeat)
    doc = timed(lambda: host.doctor(timeout=20), a.repeat)
    cmd = timed(cli, max(1, a.repeat // 2))
    p = host.probe_kvm(timeout=20)
    print(f"probe verdict: {p.verdict}")
    print(f"H1 probe_kvm {probe * 1000:.0f} ms vs child start {base * 1000:.0f} ms: "
          f"{probe / base:.2f}x")
    print(f"H2 doctor {doc * 1000:.0f} ms vs probe_kvm {probe * 1000:.0f} ms: {doc / probe:.2f}x")
    print(f"H3 `invoke doctor --json` {cmd * 1000:.0f} ms vs doctor() {doc * 1000:.0f} ms: "
          f"{cmd / doc:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
