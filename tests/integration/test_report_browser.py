"""`invoke report` opened in a real headless browser (Debian's chromium): the page renders
offline, its sections and plots are in the rendered DOM with their data points, and the
screenshot is a real picture (decoded here: not blank, not one colour). The screenshot is kept
as a CI artifact in <repo>/ci-artifacts/lab-report.png.

Chromium runs in its own session with its own profile and HOME under tmp_path, network off
(--host-resolver-rules maps every name to nothing, --proxy-server to a closed loopback port), a
timeout, and its whole process group killed afterwards; the test fails if any of its processes
is left.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from kvmlab.core.settings import load_settings
from support.reportstate import make_state

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "ci-artifacts" / "lab-report.png"
pytestmark = pytest.mark.slow


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed: apt-get install -y --no-install-recommends "
                "chromium (.ci/setup does)")


def _leftovers(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _browse(tmp: Path, url: str, *args: str, timeout: float = 90) -> tuple[str, float]:
    """Run chromium headless on url once; (stdout, seconds). Nothing of it survives the call."""
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    profile.mkdir()
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--no-first-run",
           "--disable-extensions", "--disable-background-networking", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
           "--window-size=1280,2600", "--hide-scrollbars", *args, url]
    env = {"HOME": str(tmp), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "TZ": "UTC"}
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         start_new_session=True, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", "timed out"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=10)
    seconds = time.monotonic() - t0
    for pid in _leftovers(str(profile)):   # a helper that left the group
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"chromium process {pid} outlived its run")
    assert p.returncode in (0, -signal.SIGKILL), f"chromium exit {p.returncode}: {err[-2000:]}"
    return out, seconds


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered RGB(A) rows of an 8-bit PNG (zlib + struct only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    w = h = bpp = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6), f"unexpected PNG type {depth}/{colour}"
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), w * bpp, [], bytearray(w * bpp)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, bpp, rows


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    """The report of a recorded lab, written by the real `invoke report`."""
    tmp = tmp_path_factory.mktemp("report")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMLAB_")}
    env.update(KVMLAB_HOME=str(REPO), KVMLAB_STATE_DIR=str(tmp / "state"),
               KVMLAB_CACHE=str(tmp / "cache"), KVMLAB_LOCK=str(tmp / "kvmlab.lock"),
               NO_COLOR="1")
    make_state(load_settings({"home": REPO, "state_dir": tmp / "state", "cache": tmp / "cache",
                              "lock": tmp / "kvmlab.lock"}), failed_check=True)
    out = tmp / "lab report.html"
    r = subprocess.run([sys.executable, "-m", "invoke", "report", "--output", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(out) in r.stdout + r.stderr
    return out


def test_report_renders_in_chromium_with_its_plots(report_file, tmp_path):
    url = report_file.as_uri()
    dom, seconds = _browse(tmp_path, url, "--dump-dom", "--virtual-time-budget=2000")
    print(f"chromium rendered {report_file.name} ({report_file.stat().st_size / 1024:.0f} KB) "
          f"in {seconds:.1f} s")
    for sid in ("summary", "timeline", "builds", "boots", "checks", "doctor"):
        assert f'<section id="{sid}">' in dom, f"section {sid} missing from the rendered DOM"
    svgs = re.findall(r"<svg\b.*?</svg>", dom, re.S)
    assert len(svgs) >= 3
    for svg in svgs:
        points = re.findall(r'class="rect reactive tooltip-trigger"', svg)
        assert len(points) >= 2, "a plot without data points"
    assert "lab finished, but 1 check(s) failed" in dom
    assert "0.12.1 (qemu-kvm-0.12.1.2)" in dom and "7.2.22" in dom


def test_report_screenshot_is_a_real_picture(report_file, tmp_path):
    shot = tmp_path / "lab-report.png"
    _out, seconds = _browse(tmp_path, report_file.as_uri(), f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 20_000, "no (or a tiny) screenshot"
    w, bpp, rows = _png_pixels(shot.read_bytes())
    colours: dict[bytes, int] = {}
    for row in rows[::4]:
        for x in range(0, w * bpp, bpp * 4):
            px = row[x:x + 3]
            colours[px] = colours.get(px, 0) + 1
    total = sum(colours.values())
    top = max(colours.values())
    assert len(colours) > 50, f"only {len(colours)} colours: a blank page?"
    assert top / total < 0.9, "one colour covers more than 90 % of the page"
    # the plots' bar colours are on the page (the boot chart's first series, a phase colour)
    assert any(abs(c[0] - 0x1e) < 8 and abs(c[1] - 0x88) < 8 and abs(c[2] - 0xe5) < 8
               for c in colours), "the boot-time bars are not in the picture"
    ARTIFACT.parent.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACT)
    print(f"screenshot ({seconds:.1f} s): {ARTIFACT}")
