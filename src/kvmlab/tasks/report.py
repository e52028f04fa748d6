"""report task: the lab on one self-contained HTML page (kvmlab.report)."""
from __future__ import annotations

import time
from pathlib import Path

from invoke import Context

from kvmlab.core import ui
from kvmlab.report import page

from ._common import settings, task


@task(help={"output": "the HTML file to write (default: <state>/report/lab-report.html)"})
def report(ctx: Context, output: str = "", json_: bool = False) -> None:
    """Write the lab report: one HTML file (no network needed to open it) with the step
    timeline, build phases, boot times per qemu/accelerator/guest, the checks and the doctor."""
    s = settings(ctx)
    t0 = time.monotonic()
    path, rep = page.write_report(s, Path(output).expanduser() if output else None)
    size = path.stat().st_size
    ui.info(f"report written: {path} ({size / 1024:.0f} KB, {time.monotonic() - t0:.2f} s)")
    if json_:
        ui.emit_json({"path": str(path), "bytes": size, "failed": rep.failed,
                      "report": rep.to_dict()})
