"""Terminal output: rich tables and progress on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

STATUS_STYLE = {
    "ok": "green", "pass": "green", "passed": "green", "installed": "green", "built": "green",
    "warn": "yellow", "skipped": "yellow", "cached": "cyan", "already correct": "cyan",
    "no-op": "cyan", "unknown": "magenta",
    "fail": "red", "failed": "red", "error": "red",
}


def info(msg: str) -> None:
    console.print(msg, soft_wrap=True)


def warn(msg: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {msg}", soft_wrap=True)


def error(msg: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]error:[/bold red] {msg}", soft_wrap=True)
    if hint:
        err_console.print(f"[dim]hint:[/dim] {hint}", soft_wrap=True)


def styled(status: str) -> str:
    style = STATUS_STYLE.get(str(status).split(" ")[0].lower(), "")
    return f"[{style}]{status}[/{style}]" if style else str(status)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          status_col: str | None = "status") -> None:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    idx = columns.index(status_col) if status_col in columns else -1
    for row in rows:
        cells = ["" if v is None else str(v) for v in row]
        if idx >= 0:
            cells[idx] = styled(cells[idx])
        t.add_row(*cells)
    console.print(t)


class _PlainProgress:
    """Progress for non-terminals: a line every 10% (and at the end)."""

    def __init__(self, label: str, total: int | None):
        self.label, self.total, self.done, self._next = label, total, 0, 10

    def advance(self, n: int) -> None:
        self.done += n
        if self.total:
            pct = self.done * 100 // self.total
            if pct >= self._next:
                print(f"{self.label}: {pct}% ({self.done}/{self.total} bytes)", flush=True)
                self._next = (pct // 10 + 1) * 10

    def set_total(self, total: int | None, done: int = 0) -> None:
        self.total, self.done = total, done


class _RichProgress:
    def __init__(self, progress: Any, task_id: Any):
        self._p, self._t = progress, task_id

    def advance(self, n: int) -> None:
        self._p.update(self._t, advance=n)

    def set_total(self, total: int | None, done: int = 0) -> None:
        self._p.update(self._t, total=total, completed=done)


@contextmanager
def progress(label: str, total: int | None = None, enabled: bool | None = None) -> Iterator[Any]:
    """A byte progress reporter with advance(n) and set_total(total, done)."""
    tty = sys.stdout.isatty() if enabled is None else enabled
    if not tty:
        yield _PlainProgress(label, total)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                  transient=False) as p:
        tid = p.add_task(label, total=total)
        yield _RichProgress(p, tid)
