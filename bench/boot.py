"""P4: boot-test overhead and where a test guest's boot time goes (TCG), per qemu binary.

    python3 bench/boot.py [--repeat N] [--linux-repeat N] [--qemu PATH ...] [--no-linux]

For every qemu found (the distribution's qemu-system-x86_64 as dpkg installed it, and one
qemu-kvm 0.12 build when present: $KVMLAB_TEST_QEMU_012, kvmlab's installed one, out/.../bin,
/work/real/*/x86_64-softmmu), in the same run:

1. overhead: ``kvmlab.boot.vm.boot_test()`` wall time vs the *same* qemu command run by hand
   (subprocess, without -S and the monitor, same guest files) until qemu exits. Goal < 1.2x.
2. tiny guest end to end: ``python3 -m invoke boot-test --guest tiny --no-verify`` wall time
   (goal < 0.5 s), next to ``python3 -m invoke --list`` (the start-up the CLI costs anyway).
3. linux guest: launch -> marker vs the guest's own uptime at the marker; the difference is
   firmware + loading the kernel/initrd through fw_cfg + decompression. Variants the tool
   controls: bzImage vs the uncompressed PVH vmlinux (qemu >= 4.0), gzip'd vs plain cpio
   initramfs, the tool's kernel command line vs a bare ``console=ttyS0 panic=-1``.
Machine load is printed: the 2 cores are shared, so compare ratios within one run.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from kvmlab.boot import guest as guest_mod  # noqa: E402
from kvmlab.boot import vm  # noqa: E402
from kvmlab.boot.marker import marker_for  # noqa: E402
from kvmlab.core.settings import load_settings  # noqa: E402
from kvmlab.qemu import binary as qemu_bin  # noqa: E402


def find_qemus(extra: list[str]) -> list[Path]:
    """--qemu values; else the distribution's qemu (dpkg: the baseline, never PATH's first hit,
    which after `invoke lab` is the 0.12 build) and one qemu-kvm 0.12 build."""
    found: list[Path] = [Path(p) for p in extra]
    if not extra:
        sys_q = qemu_bin.distro_qemu()
        if sys_q:
            found.append(sys_q)
        else:
            print("no distribution qemu (apt-get install qemu-system-x86): no baseline")
        cands = [os.environ.get("KVMLAB_TEST_QEMU_012", "")] + \
            glob.glob("/work/real/*/x86_64-softmmu/qemu-system-x86_64") + \
            glob.glob(str(REPO / "state/out/*/*/bin/qemu-system-x86_64")) + \
            glob.glob(str(REPO / "out/*/*/bin/qemu-system-x86_64")) + \
            glob.glob("/work/main/out/**/qemu-system-x86_64", recursive=True)
        try:
            from kvmlab.install.txn import installed_qemu
            q = installed_qemu(load_settings())
            if q:
                cands.insert(1, str(q))
        except Exception:  # noqa: BLE001 - install helper absent or nothing installed
            pass
        for c in filter(None, cands):
            try:
                qb = qemu_bin.probe_qemu(c)
            except Exception:  # noqa: BLE001 - fakes and half builds are not qemu
                continue
            if qb.version_tuple < (1, 0, 0) and not any(
                    qemu_bin.probe_qemu(f).version_tuple < (1, 0, 0) for f in found):
                found.append(Path(c))
    return found


def hand_command(cmd: list[str]) -> list[str]:
    """The tool's command without what only the tool needs (-S pause + monitor socket)."""
    out, skip = [], False
    for a in cmd:
        if skip:
            skip = False
            continue
        if a in ("-monitor", "-qmp"):
            skip = True
            continue
        if a == "-S":
            continue
        out.append(a)
    return out


def run_by_hand(cmd: list[str], serial: Path, marker: str, timeout: float = 600) -> tuple[float, float]:
    """(seconds launch -> qemu exit, seconds launch -> marker) for a command run by hand."""
    serial.unlink(missing_ok=True)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    t_marker = None
    while p.poll() is None:
        if t_marker is None and serial.exists() and marker.encode() in serial.read_bytes():
            t_marker = time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            p.kill()
            break
        time.sleep(0.005)
    total = time.monotonic() - t0
    if t_marker is None and serial.exists() and marker.encode() in serial.read_bytes():
        t_marker = total
    return total, (t_marker if t_marker is not None else float("nan"))


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def overhead(s, qemu: Path, guest: str, n: int) -> dict:
    tool, hand, marker_tool, marker_hand, uptimes = [], [], [], [], []
    vm.boot_test(s, qemu=qemu, accel="tcg", guest=guest)  # warm-up: guest cache, qemu probe
    for _ in range(n):
        r = vm.boot_test(s, qemu=qemu, accel="tcg", guest=guest)
        if not r.booted:
            raise SystemExit(f"{guest} did not boot with {qemu}: {r.failure}\n{r.serial_tail()}")
        tool.append(r.wall_seconds)
        marker_tool.append(r.seconds)
        if "uptime" in r.facts:
            uptimes.append(float(r.facts["uptime"]))
        total, m = run_by_hand(hand_command(r.command), r.serial_log, r.marker)
        hand.append(total)
        marker_hand.append(m)
    return {"tool": med(tool), "hand": med(hand), "ratio": med(tool) / med(hand),
            "marker_tool": med(marker_tool), "marker_hand": med(marker_hand),
            "uptime": med(uptimes)}


def linux_variants(s, qemu: Path, n: int) -> list[tuple[str, float, float]]:
    """(variant, launch->marker, guest uptime at marker) for kernel format / cmdline variants."""
    qb = qemu_bin.probe_qemu(qemu)
    g = guest_mod.make_linux(s)
    r = vm.boot_test(s, qemu=qemu, accel="tcg", guest="linux", kernel_format="bzimage",
                     dry_run=True)
    base = hand_command(r.command)
    i = base.index("-kernel")
    j = base.index("-append")
    bare = "console=ttyS0 panic=-1"
    tool = base[j + 1]
    gz = Path(r.run_dir) / "initrd.gz"
    gz.write_bytes(gzip.compress(g.initrd.read_bytes(), mtime=0))
    # (name, kernel, initrd, cmdline): from "what one does by hand" to what the tool does
    variants = [("bzImage, gz initrd, bare cmdline", g.kernel, gz, bare),
                ("bzImage, cpio initrd, bare cmdline", g.kernel, g.initrd, bare),
                ("bzImage, cpio initrd, tool cmdline", g.kernel, g.initrd, tool)]
    if qb.version_tuple >= (4, 0, 0) and g.vmlinux:
        variants += [("vmlinux, gz initrd, bare cmdline", g.vmlinux, gz, bare),
                     ("vmlinux, cpio initrd, tool cmdline", g.vmlinux, g.initrd, tool)]
    nonce = re.search(r"kvmlab.nonce=(\w+)", base[j + 1]).group(1)  # type: ignore[union-attr]
    marker = marker_for(nonce)
    serial = Path(r.serial_log)
    out = []
    k = base.index("-initrd")
    for name, kern, initrd, append in variants:
        if "kvmlab.nonce" not in append:
            append += f" kvmlab.nonce={nonce}"
        cmd = list(base)
        cmd[i + 1], cmd[j + 1], cmd[k + 1] = str(kern), append, str(initrd)
        ms, ups = [], []
        for _ in range(n):
            _, m = run_by_hand(cmd, serial, marker)
            up = re.search(r"KVMLAB-FACT uptime=([\d.]+)", serial.read_text(errors="replace"))
            ms.append(m)
            ups.append(float(up.group(1)) if up else float("nan"))
        out.append((name, med(ms), med(ups)))
    return out


def cli_tiny(n: int, qemu: Path) -> tuple[float, float, float]:
    def t(args: list[str]) -> float:
        xs = []
        for _ in range(n):
            t0 = time.monotonic()
            p = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
            xs.append(time.monotonic() - t0)
            if p.returncode != 0:
                raise SystemExit(f"invoke {' '.join(args)} failed: {p.stderr}")
        return med(xs)
    q = ["--qemu", str(qemu)]  # explicit: the default would be PATH's first qemu
    return (t(["--list"]), t(["boot-test", *q, "--guest", "tiny", "--accel", "tcg", "--no-verify"]),
            t(["boot-test", *q, "--guest", "tiny", "--no-verify"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="tiny guest repetitions")
    ap.add_argument("--linux-repeat", type=int, default=2, help="linux guest repetitions")
    ap.add_argument("--qemu", action="append", default=[], help="qemu binary (repeatable)")
    ap.add_argument("--no-linux", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmlab-bench-boot-") as tmp:
        os.environ.update(KVMLAB_STATE_DIR=f"{tmp}/state", KVMLAB_CACHE=f"{tmp}/cache",
                          KVMLAB_LOCK=f"{tmp}/lock")
        s = load_settings()
        qemus = find_qemus(a.qemu)
        print(f"load average at start: {os.getloadavg()[0]:.1f} (2 cores, shared)")
        print("\n== P4 overhead: boot_test() vs the same qemu command by hand (TCG, median) ==")
        print(f"{'qemu':<28} {'guest':<6} {'tool s':>8} {'hand s':>8} {'ratio':>6} "
              f"{'marker(tool)':>13} {'marker(hand)':>13} {'uptime':>7}")
        for q in qemus:
            qb = qemu_bin.probe_qemu(q)
            for g, n in (("tiny", a.repeat), ("linux", a.linux_repeat)):
                if g == "linux" and a.no_linux:
                    continue
                o = overhead(s, q, g, n)
                print(f"{qb.version[:28]:<28} {g:<6} {o['tool']:8.2f} {o['hand']:8.2f} "
                      f"{o['ratio']:6.2f} {o['marker_tool']:13.2f} {o['marker_hand']:13.2f} "
                      f"{o['uptime']:7.2f}", flush=True)
        if not qemus:
            raise SystemExit("no qemu to measure: apt-get install qemu-system-x86 or pass --qemu")
        print(f"\n== tiny guest end to end through the CLI (median of 3, {qemus[0]}) ==")
        lst, tcg, auto = cli_tiny(3, qemus[0])
        print(f"python3 -m invoke --list                          {lst:6.2f} s  (start-up baseline)")
        print(f"invoke boot-test --guest tiny --accel tcg --no-verify {tcg:6.2f} s")
        print(f"invoke boot-test --guest tiny --no-verify (auto)  {auto:6.2f} s  (+ KVM probe)")
        if a.no_linux:
            return
        print("\n== linux guest: where the time goes (by hand, TCG, median) ==")
        print("before kernel = launch->marker - guest uptime: firmware, fw_cfg load, decompression")
        for q in qemus:
            qb = qemu_bin.probe_qemu(q)
            for name, m, up in linux_variants(s, q, a.linux_repeat):
                print(f"{qb.version[:28]:<28} {name:<36} marker {m:6.2f} s  uptime {up:6.2f} s  "
                      f"before kernel {m - up:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
