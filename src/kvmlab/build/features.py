"""features: which of a recipe's configure features ended up in a build, and why others did not.

The recipe's base [build].configure line (for the RHEL 6 recipe: the spec's %build line) says what
is wanted; the builder's configure_drop / configure_add say what this builder changed; the build
tree's config-host.mak and <target>/config-target.mak (what configure decided, i.e. what is
compiled into the binary) say what is really in. A feature that was asked for but is not in the
config was silently turned off by configure (qemu 0.12's configure drops many features without
an error when a library is missing): that is reported as "missing", the interesting case.

``feature_report(recipe, builder, build_dir)`` returns rows; ``format_report(rows)`` the lines
``invoke build`` prints.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kvmlab.model.recipe import Recipe

# configure option -> (where, config key). where: "host" = config-host.mak, "target" = the
# target's config-target.mak.
ENABLE_KEYS: dict[str, tuple[str, str]] = {
    "vnc-tls": ("host", "CONFIG_VNC_TLS"),
    "vnc-sasl": ("host", "CONFIG_VNC_SASL"),
    "linux-aio": ("host", "CONFIG_LINUX_AIO"),
    "spice": ("host", "CONFIG_SPICE"),
    "usb-redir": ("host", "CONFIG_USB_REDIR"),
    "glusterfs": ("host", "CONFIG_GLUSTERFS"),
    "lzo": ("host", "CONFIG_LZO"),
    "snappy": ("host", "CONFIG_SNAPPY"),
    "vhdx": ("host", "CONFIG_VHDX"),
    "smartcard": ("host", "CONFIG_SMARTCARD"),
    "smartcard-nss": ("host", "CONFIG_SMARTCARD_NSS"),
    "mixemu": ("host", "CONFIG_MIXEMU"),
    "docs": ("host", "BUILD_DOCS"),
    "curses": ("host", "CONFIG_CURSES"),
    "sdl": ("host", "CONFIG_SDL"),
    "curl": ("host", "CONFIG_CURL"),
    "bluez": ("host", "CONFIG_BLUEZ"),
    "vde": ("host", "CONFIG_VDE"),
    "xen": ("host", "CONFIG_XEN"),
    "uuid": ("host", "CONFIG_UUID"),
    "attr": ("host", "CONFIG_ATTR"),
    "vhost-net": ("host", "CONFIG_VHOST_NET"),
    "kvm": ("target", "CONFIG_KVM"),
    "kvm-cap-pit": ("target", "CONFIG_KVM_PIT"),
    "kvm-cap-device-assignment": ("target", "CONFIG_KVM_DEVICE_ASSIGNMENT"),
}


@dataclass(frozen=True)
class FeatureRow:
    feature: str        # e.g. "spice", "trace-backend=dtrace", "audio=pa"
    wanted: bool        # the recipe's base line asks for it
    requested: bool     # this builder's configure line asks for it
    enabled: bool | None  # in the build's config (None: not checkable / no build tree)
    note: str = ""

    @property
    def status(self) -> str:
        if self.enabled is None:
            return "not checked"
        if self.requested and self.enabled:
            return "enabled"
        if self.requested and not self.enabled:
            return "missing"  # asked for, configure turned it off
        if self.wanted and not self.requested:
            return "dropped"
        return "enabled" if self.enabled else "off"


def read_mak(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[:+]?=\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _wants(args: list[str]) -> dict[str, bool]:
    """feature -> on/off as a configure line asks (later options win, like configure)."""
    want: dict[str, bool] = {}
    for a in args:
        m = re.match(r"^--(enable|disable)-([a-z0-9-]+)$", a)
        if m and m.group(2) != "werror":
            want[m.group(2)] = m.group(1) == "enable"
            continue
        m = re.match(r"^--trace-backend=(\S+)$", a)
        if m:
            for k in [k for k in want if k.startswith("trace-backend=")]:
                del want[k]
            want[f"trace-backend={m.group(1)}"] = True
            continue
        m = re.match(r"^--audio-drv-list=(\S*)$", a)
        if m:
            for k in [k for k in want if k.startswith("audio=")]:
                del want[k]
            for drv in filter(None, m.group(1).split(",")):
                want[f"audio={drv}"] = True
    return want


def _enabled(feature: str, host: dict[str, str], target: dict[str, str]) -> bool | None:
    if not host:
        return None
    if feature.startswith("trace-backend="):
        return host.get("TRACE_BACKEND") == feature.split("=", 1)[1]
    if feature.startswith("audio="):
        drv = feature.split("=", 1)[1]
        return drv in host.get("CONFIG_AUDIO_DRIVERS", "").split()
    if feature not in ENABLE_KEYS:
        return None
    where, key = ENABLE_KEYS[feature]
    table = host if where == "host" else target
    return table.get(key, "").lower() in ("y", "yes", "1")


def feature_report(recipe: Recipe, builder: str, build_dir: Path | None,
                   target: str = "x86_64-softmmu") -> list[FeatureRow]:
    """One row per feature the recipe's base line or this builder's line turns on."""
    base = _wants(list(recipe.build.get("configure") or []))
    mine = _wants(recipe.configure_args(builder))
    host = read_mak(build_dir / "config-host.mak") if build_dir else {}
    tgt = read_mak(build_dir / target / "config-target.mak") if build_dir else {}
    notes = recipe.builder(builder).notes.strip()
    rows = []
    for feat in list(base) + [f for f in mine if f not in base]:
        wanted, requested = base.get(feat, False), mine.get(feat, False)
        if not wanted and not requested:
            continue
        enabled = _enabled(feat, host, tgt)
        note = ""
        if wanted and not requested:
            note = f"dropped for {builder}" + (f": {notes}" if notes else "")
        elif requested and enabled is False:
            note = "configure turned it off (a library or tool is missing in the builder)"
        elif requested and not wanted:
            note = f"added for {builder}"
        rows.append(FeatureRow(feat, wanted, requested, enabled, note))
    return rows


def format_report(rows: list[FeatureRow]) -> list[str]:
    """Human lines: enabled features on one line, then one line per non-enabled feature."""
    on = [r.feature for r in rows if r.status == "enabled"]
    lines = [f"features enabled ({len(on)}): " + (", ".join(on) or "none")]
    for r in rows:
        if r.status != "enabled":
            lines.append(f"  {r.feature}: {r.status}" + (f" - {r.note}" if r.note else ""))
    return lines
