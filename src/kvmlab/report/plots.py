"""The report's plots as inline SVG, drawn with pygal (the optional ``report`` extra).

pygal is pure Python and writes SVG itself (no browser, no native library); its only network
reference is the tooltip script it links by default, which is turned off here (``js=[]``): the
page must open with no network. Its comments (links to its home page) and its inline config
script (only that tooltip script reads it) are dropped too. Every
chart is a plain ``<svg class="pygal-chart">`` element: bars are ``rect`` elements with the
value in a ``desc``, so a test (or a reader's devtools) finds the data points.

- ``timeline``: the lab run as horizontal bars from each step's start to its end (a Gantt chart
  of stacked bars whose first, invisible segment is the wait before the step), coloured by status
- ``build_phases``: one horizontal bar per build, split into its phases (copy, configure, make,
  deps, collect; a kmod build's prepare and make)
- ``boot_times``: the median time to the boot marker per guest, one bar per qemu x accelerator
"""
from __future__ import annotations

import importlib.util
import re
import sys
from typing import Any

from kvmlab.core.errors import ReportError
from kvmlab.report.gather import PHASE_LABELS, BootGroup, BuildPhases, StepBar

STATUS_COLOURS = {"ok": "#2e7d32", "no-op": "#78909c", "skipped": "#cfd8dc",
                  "failed": "#c62828"}
PHASE_COLOURS = ("#5c6bc0", "#8d6e63", "#26a69a", "#ef6c00", "#ab47bc", "#42a5f5",
                 "#9ccc65")
SERIES_COLOURS = ("#1e88e5", "#e53935", "#43a047", "#fb8c00", "#8e24aa", "#00acc1",
                  "#6d4c41", "#3949ab")
INSTALL_HINT = "python3 -m pip install 'kvmlab[report]' (or: python3 -m pip install pygal)"
WIDTH = 1100


def _pygal() -> Any:
    try:
        import pygal  # the `report` extra: only the report draws plots
        import pygal.style
    except ImportError:
        raise ReportError("the report's plots need pygal, which is not installed",
                          hint=INSTALL_HINT) from None
    _drop_legacy_finders()
    return pygal


def _drop_legacy_finders() -> None:
    """pygal 3.x appends a sys.meta_path finder for its map plugins (pygal.maps.*, unused
    here) that has only the old find_module API; pytest's importlib import mode calls
    find_spec on every entry, so `verify` in the same process (lab --report) failed with
    "'PluginImportFixer' object has no attribute 'find_spec'". Such finders are dropped."""
    sys.meta_path[:] = [f for f in sys.meta_path if hasattr(f, "find_spec")]


def require() -> None:
    """Fail now (before a lab run) when the plotting library is missing; it is not imported
    yet (the lab's checks run first)."""
    if importlib.util.find_spec("pygal") is None:
        raise ReportError("the report's plots need pygal, which is not installed",
                          hint=INSTALL_HINT)


def _style(colours: tuple[str, ...]) -> Any:
    return _pygal().style.Style(
        background="#ffffff", plot_background="#ffffff", foreground="#263238",
        foreground_strong="#263238", foreground_subtle="#90a4ae", opacity="1",
        opacity_hover=".85", colors=colours, font_family="DejaVu Sans, Arial, sans-serif",
        label_font_size=12, major_label_font_size=12, value_font_size=11,
        legend_font_size=12, title_font_size=15)


def _config(colours: tuple[str, ...], height: int, **kw: Any) -> dict[str, Any]:
    # (pygal 3.1 places a bottom legend with legend_at_bottom_columns below the picture)
    return {"js": [], "style": _style(colours), "width": kw.pop("width", WIDTH),
            "height": height, "explicit_size": True, "legend_at_bottom": True, "margin": 12,
            "truncate_label": -1, "truncate_legend": -1, "show_y_guides": False, **kw}


def _svg(chart: Any) -> str:
    """The chart's SVG element without pygal's comments and without its config script (the
    chart's options and labels as a JavaScript object, for the tooltip script left out): the
    page has no script at all. pygal serializes through an XML writer, so neither a comment nor
    a script's text can contain its closing tag."""
    svg = chart.render(is_unicode=True, disable_xml_declaration=True)
    svg = re.sub(r"<script\b[^>]*>.*?</script>|<script\b[^>]*/>", "", svg, flags=re.S)
    return re.sub(r"<!--.*?-->", "", svg, flags=re.S)


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def timeline(steps: list[StepBar]) -> str:
    pygal = _pygal()
    statuses = [s for s in STATUS_COLOURS if any(b.status == s for b in steps)]
    statuses += sorted({b.status for b in steps} - set(statuses))
    colours = ("transparent", *(STATUS_COLOURS.get(s, "#ffb300") for s in statuses))
    chart = pygal.HorizontalStackedBar(**_config(
        colours, 80 + 30 * max(1, len(steps)), x_title="seconds since the run started",
        print_values=False, show_x_guides=True))
    shown = list(reversed(steps))                       # the first step on top
    chart.x_labels = [f"{b.step} ({_secs(b.seconds)})" for b in shown]
    chart.add(None, [{"value": b.offset, "label": "before"} for b in shown])
    for st in statuses:
        chart.add(st, [{"value": max(b.seconds, 0.0), "label": f"{b.step}: {b.figure}"}
                       if b.status == st else None for b in shown])
    return _svg(chart)


def build_phases(builds: list[BuildPhases]) -> str:
    pygal = _pygal()
    names = [p for p in ("copy", "prepare", "configure", "make", "run", "deps", "collect")
             if any(p in b.phases for b in builds)]
    chart = pygal.HorizontalStackedBar(**_config(
        PHASE_COLOURS, 110 + 40 * max(1, len(builds)), x_title="seconds",
        print_values=False, show_x_guides=True))
    shown = list(reversed(builds))
    chart.x_labels = [f"{b.name} ({_secs(b.seconds)})" for b in shown]
    for p in names:
        chart.add(PHASE_LABELS.get(p, p),
                  [{"value": b.phases[p], "label": f"{b.name} {p}: {_secs(b.phases[p])}"}
                   if p in b.phases else None for b in shown])
    return _svg(chart)


def boot_label(g: BootGroup) -> str:
    """qemu x accelerator: the short version (0.12.1, 7.2.15) and what the monitor said."""
    version = g.qemu.split()[0] if g.qemu.strip() else "?"
    return f"qemu {version} · {g.accel}"


def boot_times(groups: list[BootGroup]) -> str:
    pygal = _pygal()
    guests = sorted({g.guest for g in groups if g.median is not None})
    series: dict[str, dict[str, BootGroup]] = {}
    for g in groups:
        if g.median is not None:      # groups that never booted are in the table only
            series.setdefault(boot_label(g), {})[g.guest] = g
    bars = sum(len(v) for v in series.values())
    chart = pygal.Bar(**_config(
        SERIES_COLOURS, 420, width=min(WIDTH, 360 + 70 * bars),
        y_title="seconds to the boot marker (median)", print_values=True,
        print_values_position="top", show_y_guides=True, show_x_guides=False,
        value_formatter=_secs))
    chart.x_labels = guests
    for label, by_guest in series.items():
        values: list[Any] = []
        for guest in guests:
            got = by_guest.get(guest)
            values.append(None if got is None or got.median is None else
                          {"value": got.median, "label": f"{label}, {guest}: {got.booted}/"
                           f"{got.runs} booted, {_secs(got.fastest)} .. {_secs(got.slowest)}"})
        chart.add(label, values)
    return _svg(chart)
