"""Terminal output: rich tables and progress on a terminal, plain lines otherwise.

Colour follows ``NO_COLOR`` (rich reads it) and ``--no-color`` (``set_color(False)``). Under
``--json`` (``json_mode()``) every human line goes to stderr, so stdout carries one JSON document
(``emit_json``).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

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


def set_color(on: bool) -> None:
    """--no-color / NO_COLOR: no escape codes at all on either stream (no colour, no bold)."""
    global console, err_console
    if on:
        return
    console = Console(highlight=False, color_system=None, file=console.file)
    err_console = Console(stderr=True, highlight=False, color_system=None)


_json_out: Any = None   # the real stdout while json_mode() is on


def json_mode() -> None:
    """Human output to stderr from now on, down to the file descriptor (child processes and
    streamed build logs too): stdout is for the one JSON document (``emit_json``)."""
    global _json_out
    if _json_out is not None:
        return
    sys.stdout.flush()
    try:
        saved = os.dup(sys.stdout.fileno())
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        _json_out = os.fdopen(saved, "w", encoding="utf-8")
    except (AttributeError, OSError, ValueError):   # no real descriptors (embedded use)
        _json_out = sys.stdout
        sys.stdout = sys.stderr
    console.file = sys.stderr


def emit_json(doc: Any) -> None:
    """The one JSON document of a --json run, on the real stdout."""
    out = _json_out if _json_out is not None else sys.stdout
    out.write(json.dumps(doc, indent=2, default=str) + "\n")
    out.flush()


def _plain(cell: str) -> str:
    # markup off, one line per row: a piped table is read by grep/awk/cut
    return " ; ".join(ln.strip() for ln in Text.from_markup(cell).plain.splitlines() if ln.strip())


def plain_table(title: str | None, columns: Sequence[str],
                rows: Iterable[Sequence[Any]]) -> list[str]:
    """A table as plain lines: title, header, one line per row; columns padded, never wrapped."""
    body = [[_plain("" if v is None else str(v)) for v in row] for row in rows]
    head = [str(c) for c in columns]
    widths = [max([len(head[i])] + [len(r[i]) for r in body if i < len(r)])
              for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(widths[i]) if i < len(cells) - 1 else c for i, c in enumerate(cells)]
        return "  ".join(padded).rstrip()
    return ([title] if title else []) + [line(head)] + [line(r) for r in body]


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          status_col: str | None = "status") -> None:
    if not console.is_terminal:
        for ln in plain_table(title, columns, rows):
            console.print(ln, markup=False, soft_wrap=True, highlight=False)
        return
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
