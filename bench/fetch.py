"""Benchmark: kvmlab's fetch vs `curl -o` on a 200 MB file from a loopback server (same run).

    python3 bench/fetch.py [--mb 200] [--rounds 6]

The server (tests/support/httpserver.py, sendfile) runs in a child process so it does not share
the GIL with kvmlab's client. Both clients write the file to the same directory; kvmlab also
verifies it (pinned sha256, hashed while streaming) and moves it into the cache. Dirty pages are
synced (untimed) before each run and the order alternates. Prints best and median throughput and
the ratio kvmlab/curl (goal >= 0.9).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
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

        from kvmlab.config import load_settings
        from kvmlab.fetch import FetchOptions, fetch_source
        from kvmlab.fsutil import sha256_file
        from kvmlab.recipe import load_recipe
        os.environ.update({"KVMLAB_STATE_DIR": str(tmp / "state"),
                           "KVMLAB_CACHE": str(tmp / "cache"),
                           "KVMLAB_LOCK": str(tmp / "state" / "kvmlab.lock"),
                           "KVMLAB_RECIPES_DIR": str(tmp / "recipes")})
        (tmp / "recipes").mkdir()
        (tmp / "recipes" / "bench.toml").write_text(
            f'name = "bench"\nversion = "1"\nkind = "kmod"\n[source]\nfile = "{data.name}"\n'
            f'urls = ["{url}"]\nsha256 = "{sha256_file(data)}"\n')
        s = load_settings()
        recipe = load_recipe(s.recipes_dir, "bench")
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
