#!/usr/bin/env python3
"""Benchmark for kmod builds (baseline measured in the same run; prints ratios).

K1  module build through the tool (kmodbuild.build_kmod: image check, fresh tree copy, series,
    compat plan, make in the builder, .modinfo/sha256 collection, manifest) vs the same
    `make -C <headers> M=<dir> KCFLAGS=... modules` run "by hand" in the same image (a docker SDK
    run of the same command, same user, same environment). Both sides start from the same
    extracted source and an empty ccache volume of their own; the order alternates per round.
    Goal: <= 1.05x.
K0  (reported once) image build time, if the image had to be built, and the one-time source
    extraction (prepare) time.
R   whether the by-hand modules are bit-identical to the tool's (different build directories:
    -ffile-prefix-map keeps paths out of the .ko).

    python3 bench/kmod.py [--repeat N] [--jobs N] [--recipe kvm-kmod-6.1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="kvm-kmod-6.1")
    ap.add_argument("--builder", default="debian12")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="rounds (each: one tool + one by hand)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kvmlab-bench-kmod-"))
    os.environ["KVMLAB_HOME"] = str(REPO)
    os.environ["KVMLAB_STATE_DIR"] = str(tmp / "state")
    os.environ["KVMLAB_CACHE"] = str(tmp / "cache")
    os.environ["KVMLAB_LOCK"] = str(tmp / "state" / "kvmlab.lock")

    from kvmlab.build import images
    from kvmlab.build import kmod as K
    from kvmlab.build import qemu as B
    from kvmlab.core.fsutil import sha256_file
    from kvmlab.core.settings import load_settings
    from kvmlab.model.recipe import load_recipe

    s = load_settings()
    recipe = load_recipe(s.recipes_dir, args.recipe)
    spec = K.kmod_spec(recipe)
    client = images.docker_client()
    volumes: list[str] = []

    def fresh_ccache() -> str:
        name = f"kvmlab-bench-kmod-ccache-{uuid.uuid4().hex[:8]}"
        volumes.append(name)
        os.environ["KVMLAB_CCACHE_VOLUME"] = name
        return name

    tool_times: list[float] = []
    hand_times: list[float] = []
    identical: list[bool] = []
    try:
        t = time.monotonic()
        image = images.recipe_image(s, recipe, args.builder, client=client)
        t_image = time.monotonic() - t
        print(f"K0 image {image.ref}: {'present' if image.noop else 'built'} in {t_image:.1f} s")

        # one-time preparation (extraction) + a warm-up build that is not counted
        fresh_ccache()
        res = K.build_kmod(s, recipe, args.builder, jobs=args.jobs, quiet=True)
        print(f"K0 source extraction (prepare): {res.manifest['seconds']['prepare']:.1f} s; "
              f"first build: {res.manifest['seconds']['total']:.1f} s")
        bdir = B.build_dir(s, recipe.name, args.builder)
        pristine = s.work(recipe.name) / f"kmod-src-{args.builder}"
        make_tmpl = res.manifest["make"]

        def run_tool() -> float:
            fresh_ccache()
            shutil.rmtree(res.out_dir, ignore_errors=True)
            t0 = time.monotonic()
            r = K.build_kmod(s, recipe, args.builder, jobs=args.jobs, quiet=True)
            dt = time.monotonic() - t0
            assert not r.noop
            return dt

        def run_hand(i: int) -> float:
            vol = fresh_ccache()
            hand = tmp / f"hand{i}"
            shutil.rmtree(hand, ignore_errors=True)
            t0 = time.monotonic()
            # what a person does: copy the extracted kvm dirs, add the Kbuild wrapper and the
            # trace include dir, run make in the same image
            shutil.copytree(pristine, hand, symlinks=True)
            kb = (bdir / spec.module_dir / "Kbuild").read_text()
            (hand / spec.module_dir / "Kbuild").write_text(kb.replace(str(bdir), str(hand)))
            (hand / "include/trace").mkdir(parents=True, exist_ok=True)
            make = [a.replace(str(bdir), str(hand)) for a in make_tmpl]
            c = client.containers.run(
                image.ref, make, detach=True, user=f"{os.getuid()}:{os.getgid()}",
                working_dir=str(hand), network_mode="none",
                volumes={str(hand): {"bind": str(hand), "mode": "rw"},
                         vol: {"bind": B.CCACHE_DIR, "mode": "rw"}},
                environment={"CCACHE_DIR": B.CCACHE_DIR, "PATH": B.CONTAINER_PATH,
                             "HOME": "/tmp", "LC_ALL": "C"})
            try:
                for _ in c.logs(stream=True, follow=True):
                    pass
                rc = c.wait(timeout=120)["StatusCode"]
            finally:
                c.remove(force=True)
            dt = time.monotonic() - t0
            assert rc == 0, f"by-hand make failed (exit {rc})"
            same = all(sha256_file(hand / rel) == sha256_file(res.out_dir / Path(rel).name)
                       for rel in recipe.artifacts["modules"])
            identical.append(same)
            return dt

        for i in range(args.repeat):
            if i % 2 == 0:
                tool_times.append(run_tool())
                hand_times.append(run_hand(i))
            else:
                hand_times.append(run_hand(i))
                tool_times.append(run_tool())
            print(f"  round {i + 1}: tool {tool_times[-1]:.1f} s, by hand {hand_times[-1]:.1f} s")
    finally:
        for v in volumes:
            try:
                client.volumes.get(v).remove(force=True)
            except Exception:
                pass
        shutil.rmtree(tmp, ignore_errors=True)

    tool = statistics.median(tool_times)
    hand = statistics.median(hand_times)
    ratio = tool / hand
    print(f"K1 module build, cold ccache, -j{args.jobs}: tool {tool:.1f} s vs by hand {hand:.1f} s"
          f" -> ratio {ratio:.3f}x (goal <= 1.05x) {'OK' if ratio <= 1.05 else 'OVER'}")
    print(f"R  by-hand modules bit-identical to the tool's (other build dir): "
          f"{'yes' if all(identical) else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
