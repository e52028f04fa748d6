"""Inventories (``--hosts``): kvmlab's host lists and Ansible inventories, as one list of hosts.

``--hosts FILE`` takes every host of FILE; ``--hosts FILE:PATTERN`` (Ansible inventories only)
the hosts matching an Ansible host pattern: a group or host name, ``web:db`` (either),
``labs:&web`` (both), ``labs:!db`` (but not), ``web*`` — what ``ansible --limit`` takes.

FILE is read as:

- kvmlab's list: one target per line (``ssh://user@host:port``, ``user@host[:port]``, ``#``
  comments, an optional ``key=PATH``) — a file every line of which reads so;
- kvmlab's TOML (``*.toml``): ``hosts = ["ssh://..."]`` or ``[[host]]`` tables with
  ``address``, ``user``, ``port``, ``key``;
- an Ansible inventory otherwise (INI or YAML, ``*.ini``/``*.yml``/``*.yaml``/a directory always):
  read by Ansible itself (``ansible-inventory --list``, ansible-core from the ``[hosts]``
  extra), so groups, children, ranges and group_vars mean what they mean to Ansible. A host's
  ``ansible_host`` / ``ansible_port`` / ``ansible_user`` / ``ansible_ssh_private_key_file``
  (and the older ``ansible_ssh_host`` / ``_port`` / ``_user``) say where and how to log in (the
  user defaults to root: kvmlab runs its steps as root); ``ansible_connection=local`` /
  ``docker`` make it testinfra's ``local://`` / ``docker://NAME`` for ``verify``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core import proc
from kvmlab.core.errors import LabError
from kvmlab.lab.hostkeys import HOSTS_EXTRA_HINT

ANSIBLE_SUFFIXES = {".ini", ".yml", ".yaml", ".cfg", ".json"}
_CONNECTIONS = {None: "ssh", "ssh": "ssh", "smart": "ssh", "paramiko": "ssh",
                "ansible.builtin.ssh": "ssh", "ansible.builtin.paramiko_ssh": "ssh",
                "local": "local", "ansible.builtin.local": "local",
                "docker": "docker", "community.docker.docker": "docker",
                "community.docker.docker_api": "docker"}


@dataclass(frozen=True)
class HostSpec:
    address: str
    user: str = "root"
    port: int = 22
    key: str | None = None
    name: str = ""                   # the inventory's name for it (Ansible); "" in kvmlab lists
    groups: tuple[str, ...] = ()     # its Ansible groups (parents too), sorted
    connection: str = "ssh"          # ssh, local or docker

    @property
    def endpoint(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    @property
    def label(self) -> str:
        if self.connection != "ssh":
            return self.name or self.address
        return f"{self.name} ({self.endpoint})" if self.name and self.name != self.address \
            else self.endpoint


# a host is a name or an [IPv6] address: "[db]" is an INI group header, not a target
_TARGET_RE = re.compile(r"^(?:ssh://)?(?:(?P<user>[^@\s/]+)@)?"
                        r"(?P<host>\[[0-9A-Fa-f:.]+(?:%[\w.-]+)?\]|[^:\s/\[\]=]+)"
                        r"(?::(?P<port>\d+))?/?$")


def parse_target(text: str, where: str) -> HostSpec:
    parts = text.split()
    m = _TARGET_RE.match(parts[0])
    if not m:
        raise LabError(f"{where}: not an ssh target: {parts[0]!r}",
                       hint="write ssh://user@host:port or user@host[:port]")
    key = None
    for extra in parts[1:]:
        if extra.startswith("key="):
            key = extra[4:]
        else:
            raise LabError(f"{where}: unknown field {extra!r}", hint="only key=PATH may follow")
    return HostSpec(address=m["host"].strip("[]"), user=m["user"] or "root",
                    port=int(m["port"] or 22), key=key)


def _list_lines(text: str) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append((n, line))
    return out


def _is_kvmlab_list(text: str) -> bool:
    """Every line a target (with at most key=PATH), or a line with a URL scheme (no Ansible
    host has one): kvmlab's list, not an Ansible INI file."""
    lines = _list_lines(text)
    if any("://" in line for _n, line in lines):
        return True
    for _n, line in lines:
        try:
            parse_target(line, "")
        except LabError:
            return False
    return True


def _parse_toml(path: Path, text: str) -> list[HostSpec]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LabError(f"{path}: TOML syntax error: {e}") from None
    hosts = [parse_target(str(h), f"{path}: hosts[{i}]")
             for i, h in enumerate(data.get("hosts", []))]
    for i, t in enumerate(data.get("host", [])):
        if "address" not in t:
            raise LabError(f"{path}: [[host]] #{i + 1} has no 'address'")
        hosts.append(HostSpec(address=t["address"], user=t.get("user", "root"),
                              port=int(t.get("port", 22)), key=t.get("key")))
    return hosts


# ---------------------------------------------------------------------------------------------
# Ansible


def _ansible_error(path: Path, stderr: str) -> LabError:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    detail = ""
    if "<<< caused by >>>" in lines:
        rest = lines[lines.index("<<< caused by >>>") + 1:]
        detail = rest[0] if rest else ""
    if not detail:
        useful = [ln for ln in lines if "Unable to parse" not in ln and
                  "No inventory was parsed" not in ln]
        detail = (useful or lines or ["ansible-inventory failed"])[0]
    detail = re.sub(r"^\[(WARNING|ERROR)\]:\s*", "", detail)
    return LabError(f"inventory {path}: Ansible cannot read it: {detail[:300]}",
                    hint=f"fix the file; `ansible-inventory --list -i {path}` shows what Ansible "
                         "makes of it (kvmlab's own list: one ssh://user@host:port per line)")


def ansible_inventory(path: Path, pattern: str | None = None) -> dict[str, Any]:
    """``ansible-inventory --list -i PATH [--limit PATTERN]`` as JSON (this interpreter's
    ansible-core, so kvmlab's venv is the one asked)."""
    if importlib.util.find_spec("ansible") is None:
        raise LabError(f"inventory {path} is an Ansible inventory, and ansible-core is not "
                       "installed", hint=HOSTS_EXTRA_HINT)
    argv = [sys.executable, "-m", "ansible.cli.inventory", "--list", "-i", str(path)]
    if pattern:
        argv += ["--limit", pattern]
    with tempfile.TemporaryDirectory(prefix="kvmlab-ansible-") as tmp:
        env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
               "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_DEPRECATION_WARNINGS": "False",
               "ANSIBLE_LOCAL_TEMP": tmp}    # its scratch files: not left in ~/.ansible
        cp = proc.run(argv, timeout=120, env=env, what="ansible-inventory")
    if cp.returncode != 0:
        raise _ansible_error(path, cp.stderr)
    try:
        data = json.loads(cp.stdout)
    except json.JSONDecodeError:
        raise _ansible_error(path, cp.stderr or cp.stdout) from None
    return data if isinstance(data, dict) else {}


def _groups_of(data: dict[str, Any]) -> dict[str, set[str]]:
    """host -> every group it is in (directly or through children), without all/ungrouped."""
    parents: dict[str, set[str]] = {}
    for g, body in data.items():
        if g != "_meta" and isinstance(body, dict):
            for child in body.get("children", []):
                parents.setdefault(child, set()).add(g)

    def ancestors(g: str, seen: set[str]) -> set[str]:
        for p in parents.get(g, set()) - seen:
            seen.add(p)
            ancestors(p, seen)
        return seen

    out: dict[str, set[str]] = {}
    for g, body in data.items():
        if g == "_meta" or not isinstance(body, dict):
            continue
        for h in body.get("hosts", []):
            out.setdefault(h, set()).update({g} | ancestors(g, set()))
    for h in data.get("_meta", {}).get("hostvars", {}):
        out.setdefault(h, set())
    return {h: gs - {"all", "ungrouped"} for h, gs in out.items()}


def _var(v: dict[str, Any], *names: str) -> Any:
    return next((v[n] for n in names if v.get(n) not in (None, "")), None)


def host_from_vars(name: str, v: dict[str, Any], groups: set[str], where: str) -> HostSpec:
    conn = _var(v, "ansible_connection")
    if conn not in _CONNECTIONS:
        raise LabError(f"{where}: host {name}: ansible_connection={conn} is not something kvmlab "
                       "can use", hint="kvmlab takes ssh (the default), local and docker hosts")
    port = _var(v, "ansible_port", "ansible_ssh_port") or 22
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise LabError(f"{where}: host {name}: ansible_port={port!r} is not a port number",
                       hint="give a whole number, e.g. ansible_port=2222") from None
    key = _var(v, "ansible_ssh_private_key_file", "ansible_private_key_file")
    return HostSpec(address=str(_var(v, "ansible_host", "ansible_ssh_host") or name),
                    user=str(_var(v, "ansible_user", "ansible_ssh_user", "ansible_remote_user")
                             or "root"),
                    port=port, key=os.path.expanduser(str(key)) if key else None, name=name,
                    groups=tuple(sorted(groups)), connection=_CONNECTIONS[conn])


def _all_groups(data: dict[str, Any]) -> list[str]:
    names = {g for g in data if g != "_meta"}
    for body in data.values():
        if isinstance(body, dict):
            names.update(body.get("children", []))
    return sorted(names - {"all", "ungrouped"})


def parse_ansible(path: Path, pattern: str | None) -> list[HostSpec]:
    data = ansible_inventory(path, pattern)
    hostvars = data.get("_meta", {}).get("hostvars", {})
    groups = _groups_of(data)
    if not groups:
        if pattern:
            known = _all_groups(ansible_inventory(path))
            raise LabError(f"host pattern {pattern!r} matches no host in inventory {path}",
                           hint="its groups: " + (", ".join(known) or "(none)") +
                                "; write FILE:GROUP, or FILE for every host")
        raise LabError(f"inventory {path} names no hosts",
                       hint="list hosts under a [group] (INI) or hosts: (YAML)")
    return [host_from_vars(h, hostvars.get(h, {}), groups[h], str(path)) for h in sorted(groups)]


# ---------------------------------------------------------------------------------------------
# FILE[:PATTERN]


def split_value(value: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:PATTERN`` -> (file, pattern); the file part is the longest prefix
    that exists (paths may hold ':' too)."""
    p = Path(os.path.expanduser(value))
    if p.exists() or ":" not in value:
        return p, None
    cuts = [i for i, c in enumerate(value) if c == ":"]
    for i in reversed(cuts):
        head = Path(os.path.expanduser(value[:i]))
        if head.exists():
            return head, value[i + 1:] or None
    return p, None


_cache: dict[tuple[str, int, int], list[HostSpec]] = {}


def load_hosts(value: str) -> list[HostSpec]:
    """The hosts ``--hosts value`` names (see the module docstring); read once per process
    while the file is unchanged (the flag checks it, the task uses it)."""
    path, _pattern = split_value(value)
    try:
        st = path.stat()
        key = (value, st.st_mtime_ns, st.st_size)
    except OSError:
        return _load_hosts(value)
    if key not in _cache:
        _cache[key] = _load_hosts(value)
    return list(_cache[key])


def _load_hosts(value: str) -> list[HostSpec]:
    path, pattern = split_value(value)
    if not path.exists():
        raise LabError(f"inventory {value}: no such file",
                       hint="give an inventory file (FILE, or FILE:GROUP for an Ansible one)")
    kind = "ansible" if path.is_dir() or path.suffix in ANSIBLE_SUFFIXES else ""
    if not kind:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise LabError(f"cannot read inventory {path}: {getattr(e, 'strerror', e)}",
                           hint="check the path and its permissions") from None
        kind = "toml" if path.suffix == ".toml" else \
            "list" if _is_kvmlab_list(text) else "ansible"
    if kind == "ansible":
        return parse_ansible(path, pattern)
    if pattern:
        raise LabError(f"inventory {path} is a kvmlab host list: {pattern!r} selects nothing "
                       "there", hint="host patterns (FILE:GROUP) work with Ansible inventories; "
                                     "give the file alone")
    hosts = _parse_toml(path, text) if kind == "toml" else \
        [parse_target(line, f"{path}:{n}") for n, line in _list_lines(text)]
    if not hosts:
        raise LabError(f"inventory {path} names no hosts",
                       hint="one ssh://user@host:port per line, or an Ansible inventory")
    return hosts
