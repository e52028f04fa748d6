"""Benchmark: kvmlab's fetch vs `curl -o` on a 200 MB file, and a stalled mirror (same run).

    python3 bench/fetch.py [--mb 200] [--rounds 6] [--only throughput|stall]

throughput: the server (tests/support/httpserver.py, sendfile) runs in a child process so it
does not share the GIL with kvmlab's client. Both clients write the file to the same directory;
kvmlab also verifies it (pinned sha256, hashed while streaming) and moves it into the cache.
Dirty pages are synced (untimed) before each run and the order alternates. Prints best and
median throughput and the ratio kvmlab/curl (goal >= 0.9).

stall: with the default FetchOptions, a recipe whose first mirror sends 10 bytes of the body and
then nothing, the second a healthy mirror. Measured: the time from the start of the fetch until
the second mirror gets its request (the user's wait), next to the same fetch from the healthy
mirror alone (baseline) and the stall timeout; goal <= 35 s before the next mirror is tried.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
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

from support.httpserver import LoopbackServer  # noqa: E402


def _serve(path: Path, conn) -> None:
    with LoopbackServer({path.name: path}) as srv:
        conn.send(srv.port)
        conn.recv()  # until the parent says stop


def _bench_env(tmp: Path, name: str, file: str, urls: list[str], sha: str) -> tuple:
    """Settings + recipe NAME under tmp (state, cache, lock, recipes all in tmp)."""
    from kvmlab.core.settings import load_settings
    from kvmlab.model.recipe import load_recipe
    os.environ.update({"KVMLAB_STATE_DIR": str(tmp / "state"),
                       "KVMLAB_CACHE": str(tmp / "cache"),
                       "KVMLAB_LOCK": str(tmp / "state" / "kvmlab.lock"),
                       "KVMLAB_RECIPES_DIR": str(tmp / "recipes")})
    (tmp / "recipes").mkdir(parents=True, exist_ok=True)
    url_list = ", ".join(f'"{u}"' for u in urls)
    (tmp / "recipes" / f"{name}.toml").write_text(
        f'name = "{name}"\nversion = "1"\nkind = "kmod"\n[source]\nfile = "{file}"\n'
        f'urls = [{url_list}]\nsha256 = "{sha}"\n')
    s = load_settings()
    return s, load_recipe(s.recipes_dir, name)


def stall() -> None:
    """Time until the next mirror is tried after a stalled one, default settings."""
    from kvmlab.source.fetch import FetchOptions, fetch_source
    from support.fakeqemu import make_fake_qemu_tarball, sha256_file
    tmp = Path(tempfile.mkdtemp(prefix="kvmlab-bench-stall-"))
    try:
        tarball = make_fake_qemu_tarball(tmp / "dist")
        opts = FetchOptions(progress=False)  # the defaults a user gets
        with LoopbackServer({tarball.name: tarball.read_bytes()}) as srv:
            healthy, stalled = srv.url("range", tarball.name), srv.url("stall", tarball.name)
            sha = sha256_file(tarball)
            s, r = _bench_env(tmp / "a", "healthy", tarball.name, [healthy], sha)
            t0 = time.monotonic()
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), \
                    contextlib.redirect_stdout(null):
                fetch_source(s, r, options=opts)
            base = time.monotonic() - t0
            s, r = _bench_env(tmp / "b", "stalled", tarball.name, [stalled, healthy], sha)
            srv.requests.clear(), srv.times.clear()
            t0 = time.monotonic()
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), \
                    contextlib.redirect_stdout(null):
                res = fetch_source(s, r, options=opts)
            total = time.monotonic() - t0
            first = next(t for (mode, *_), t in zip(srv.requests, srv.times) if mode == "range")
            wait = first - t0
            assert res.sha256 == sha
        print(f"stalled mirror (sends {srv.stall_after} bytes, then nothing), default settings "
              f"(stall timeout {opts.read_timeout:g} s), load average {os.getloadavg()[0]:.1f}:")
        print(f"  baseline: fetch from the healthy mirror alone   {base:7.3f} s")
        print(f"  stalled first: until the next mirror is tried   {wait:7.3f} s "
              f"({wait / opts.read_timeout:.2f}x the stall timeout, "
              f"{wait / base:.0f}x the baseline; goal <= 35 s: {'ok' if wait <= 35 else 'MISSED'})")
        print(f"  stalled first: whole fetch                      {total:7.3f} s "
              f"(requests: {', '.join(q[0] for q in srv.requests)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--only", choices=("throughput", "stall"))
    args = ap.parse_args()
    if args.only != "throughput":
        stall()
    if args.only == "stall":
        return
    if not shutil.which("curl"):
        sys.exit("curl is not installed (apt-get install curl)")
    tmp = Path(tempfile.mkdtemp(prefix="kvmlab-bench-fetch-"))
    parent, child = mp.Pipe()
    proc = None
    try:
        data = tmp / "big.tar.gz"
        with open(data, "wb") as f:
            block = os.urandom(1 << 20)
            for i in range(args.mb):
                f.write(block[i % 256:] + block[:i % 256])
        proc = mp.Process(target=_serve, args=(data, child), daemon=True)
        proc.start()
        url = f"http://127.0.0.1:{parent.recv()}/range/{data.name}"

        from kvmlab.core.fsutil import sha256_file
        from kvmlab.source.fetch import FetchOptions, fetch_source
        s, recipe = _bench_env(tmp, "bench", data.name, [url], sha256_file(data))
        opts = FetchOptions(progress=False)

        def kvmlab_fetch() -> None:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                fetch_source(s, recipe, force=True, options=opts)

        def curl() -> None:
            subprocess.run(["curl", "-sSf", "-o", str(tmp / "curl.out"), url], check=True,
                           timeout=600)

        times: dict[str, list[float]] = {"curl": [], "kvmlab": []}
        for i in range(args.rounds):
            order = [("curl", curl), ("kvmlab", kvmlab_fetch)]
            for name, fn in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                os.sync()  # no dirty pages of the previous run throttling this one's writes
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        print(f"{args.mb} MB from 127.0.0.1, {args.rounds} rounds "
              f"(load average {os.getloadavg()[0]:.1f}):")
        for k, v in times.items():
            best, med = min(v), statistics.median(v)
            print(f"  {k:7s} best {best:6.3f} s ({args.mb / best:6.1f} MB/s)  "
                  f"median {med:6.3f} s ({args.mb / med:6.1f} MB/s)")
        ratio_best = min(times["curl"]) / min(times["kvmlab"])
        ratio_med = statistics.median(times["curl"]) / statistics.median(times["kvmlab"])
        print(f"ratio kvmlab/curl throughput: best {ratio_best:.2f}x, median {ratio_med:.2f}x "
              "(goal >= 0.9x)")
    finally:
        parent.send("stop") if proc and proc.is_alive() else None
        if proc:
            proc.join(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
