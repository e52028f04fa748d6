#!/usr/bin/env python3
"""Benchmarks for `build` (baselines measured in the same run; prints ratios).

P1  no-op build with unchanged inputs (in-process call, and `invoke build` as a command): goal < 1 s
P2  cold build through the tool vs the same configure + make run "by hand" (a docker SDK run of
    the same script, same image, same user, an empty ccache volume each): goal <= 1.05x
P3  rebuild after `clean` with a warm ccache vs the cold build: goal <= 0.3x

By default the fake qemu-like tree (tests/support/fakeqemu.py) is built. `--source TARBALL` builds a
real tree instead with the recipe named by --recipe (recipes from KVMLAB_RECIPES_DIR / the repo).
Cold runs use throw-away ccache volumes (KVMLAB_CCACHE_VOLUME), removed at the end.

    python3 bench/build.py [--source qemu-kvm-0.12.1.2.tar.gz] [--recipe NAME] [--repeat N] [--jobs N]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", help="a real source tarball or directory (default: the fake tree)")
    ap.add_argument("--recipe", default="qemu-kvm-0.12.1.2", help="recipe used with --source")
    ap.add_argument("--builder", default="debian12")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=0,
                    help="cold runs per side (default: 3 for the fake tree, 1 for --source)")
    args = ap.parse_args()
    repeat = args.repeat or (1 if args.source else 3)

    tmp = Path(tempfile.mkdtemp(prefix="kvmlab-bench-build-"))
    os.environ["KVMLAB_HOME"] = str(REPO)
    os.environ["KVMLAB_STATE_DIR"] = str(tmp / "state")
    os.environ["KVMLAB_CACHE"] = str(tmp / "cache")
    os.environ["KVMLAB_LOCK"] = str(tmp / "state" / "kvmlab.lock")
    source = args.source
    recipe_name = args.recipe
    if not source:
        from support.fakeqemu import make_fake_home
        env = make_fake_home(tmp / "home")
        os.environ.update(env)
        recipe_name = env["KVMLAB_RECIPE"]
    os.environ["KVMLAB_RECIPE"] = recipe_name
    os.environ["KVMLAB_BUILDER"] = args.builder

    from kvmlab.build import images
    from kvmlab.build import qemu as B
    from kvmlab.core.settings import load_settings
    from kvmlab.model.recipe import load_recipe
    from kvmlab.source import prepare as pipeline

    s = load_settings()
    recipe = load_recipe(s.recipes_dir, recipe_name)
    client = images.docker_client()
    info = images.ensure_image(s, args.builder, client=client, quiet=True)
    prepared = pipeline.prepare(s, recipe, args.builder, source=source)
    configure, make = B._commands(recipe, args.builder, args.jobs)
    script = B._script(configure, make)
    volumes_made: list[str] = []

    def fresh_volume(tag: str) -> str:
        name = f"kvmlab-bench-ccache-{os.getpid()}-{tag}"
        client.volumes.create(name)
        volumes_made.append(name)
        return name

    def by_hand(i: int) -> float:
        """configure + make in the same image, as a user would with `docker run`."""
        tree = tmp / f"hand-{i}"
        shutil.copytree(prepared.src_dir, tree, symlinks=True)
        vol = fresh_volume(f"hand{i}")
        env = {**B._env(recipe, args.builder), "CCACHE_DIR": B.CCACHE_DIR,
               "PATH": B.CONTAINER_PATH, "HOME": "/tmp", "LC_ALL": "C",
               "SOURCE_DATE_EPOCH": str(B.source_date_epoch(tree))}
        t0 = time.monotonic()
        c = client.containers.run(info.ref, ["/bin/sh", "-c", script], detach=True,
                                  user=f"{os.getuid()}:{os.getgid()}", working_dir=str(tree),
                                  volumes={str(tree): {"bind": str(tree), "mode": "rw"},
                                           vol: {"bind": B.CCACHE_DIR, "mode": "rw"}},
                                  environment=env, network_mode="none")
        try:
            for _ in c.logs(stream=True, follow=True):
                pass
            rc = c.wait(timeout=7200)["StatusCode"]
        finally:
            c.remove(force=True)
        dt = time.monotonic() - t0
        shutil.rmtree(tree, ignore_errors=True)
        if rc != 0:
            raise SystemExit(f"the by-hand build failed (exit {rc})")
        return dt

    runs: list[float] = []  # the tool's own configure+make (container) time per cold build

    def through_tool(vol: str) -> float:
        os.environ["KVMLAB_CCACHE_VOLUME"] = vol
        t0 = time.monotonic()
        r = B.build(s, recipe, args.builder, jobs=args.jobs, force=True, source=source, quiet=True)
        dt = time.monotonic() - t0
        assert not r.noop
        runs.append(r.manifest["timings"]["run"])
        return dt

    try:
        print(f"bench build: {recipe.name} with {args.builder} ({info.ref}), -j{args.jobs}, "
              f"{repeat} cold run(s) per side; load average {os.getloadavg()[0]:.1f}", flush=True)
        hand, tool = [], []
        for i in range(repeat):  # alternate the two sides so machine noise hits both
            hand.append(by_hand(i))
            tool_vol = fresh_volume(f"tool{i}")
            tool.append(through_tool(tool_vol))
            print(f"  cold run {i + 1}: by hand {hand[-1]:.2f} s, through the tool {tool[-1]:.2f} s",
                  flush=True)
        h, t = statistics.median(hand), statistics.median(tool)
        print(f"P2 cold build: tool {t:.2f} s vs by hand {h:.2f} s -> ratio {t / h:.3f}x "
              f"(goal <= 1.05x)")
        over = [tt - rr for tt, rr in zip(tool, runs)]
        print(f"P2 tool overhead outside configure+make: median {statistics.median(over):.2f} s "
              f"-> tool/own-container ratio {statistics.median([tt / rr for tt, rr in zip(tool, runs)]):.3f}x "
              f"(load-independent view of the same goal)")

        # P1: unchanged inputs (the last tool build is in place)
        t0 = time.monotonic()
        r = B.build(s, recipe, args.builder, jobs=args.jobs, source=source, quiet=True)
        p1_call = time.monotonic() - t0
        assert r.noop
        cmd = [sys.executable, "-m", "invoke", "build", "--no-verify"]
        if source:
            cmd += ["--source", str(source)]
        t0 = time.monotonic()
        cp = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
        p1_cli = time.monotonic() - t0
        if cp.returncode != 0 or "no-op" not in cp.stdout:
            print("P1: `invoke build` was not a no-op:\n" + (cp.stdout + cp.stderr)[-2000:])
            return 1
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=REPO, capture_output=True,
                       timeout=120)
        startup = time.monotonic() - t0
        print(f"P1 no-op build: {p1_call:.3f} s in-process, {p1_cli:.2f} s as `invoke build` "
              f"(of which {startup:.2f} s is `invoke --list` start-up) (goal < 1 s)")

        # P3: clean, then rebuild with the ccache the last cold tool build filled
        B.clean(s, recipe.name, args.builder)
        t0 = time.monotonic()
        r = B.build(s, recipe, args.builder, jobs=args.jobs, source=source, quiet=True)
        warm = time.monotonic() - t0
        assert not r.noop
        print(f"P3 rebuild after clean, warm ccache: {warm:.2f} s vs cold {tool[-1]:.2f} s -> "
              f"ratio {warm / tool[-1]:.3f}x (goal <= 0.3x)")
    finally:
        os.environ.pop("KVMLAB_CCACHE_VOLUME", None)
        for v in volumes_made:
            try:
                client.volumes.get(v).remove(force=True)
            except Exception as e:  # noqa: BLE001
                print(f"could not remove volume {v}: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
