"""Process helpers shared by the steps that run builds and VMs."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the duration: SIGTERM raises KeyboardInterrupt, so the same cleanup runs as for
    Ctrl-C (containers removed, VMs killed). A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def kill_group(proc: subprocess.Popen, wait: float = 10) -> None:
    """SIGKILL a child started with start_new_session=True and its whole process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
        pass
