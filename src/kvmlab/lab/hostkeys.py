"""ssh host keys, checked the way ssh and Ansible check them by default, on every ssh path kvmlab
takes (Fabric in lab/remote.py, testinfra's ssh and paramiko hosts in lab/verify.py).

Known keys come from kvmlab's own known_hosts (setting ``known_hosts``, default
``<state>/known_hosts``: the only file kvmlab writes) and the user's ``~/.ssh/known_hosts``
(setting ``user_known_hosts``, read only). A host is named as ssh names it there: ``host`` on port
22, ``[host]:port`` otherwise; plain, hashed (``|1|salt|hash``, HashKnownHosts) and pattern
(``*``, ``?``, ``!``) entries are read; ``@cert-authority`` / ``@revoked`` lines are not used.

- the host offers a key listed for it: accepted;
- the host is unknown: refused before anything is pushed or run, naming the key type and its
  SHA256 fingerprint as ssh prints them; with ``accept_new`` (``--accept-new-host-keys``, ssh's
  ``StrictHostKeyChecking=accept-new``) the key is recorded in kvmlab's known_hosts (a plain
  ``[host]:port type base64`` line) and accepted, and later runs accept it without the flag;
- the host is known with another key: always refused (REMOTE HOST IDENTIFICATION HAS CHANGED),
  with both fingerprints and the file and line to fix.

``check_host`` asks a host for its key (an ssh handshake, no login) and applies that;
``prepare_client`` does the same inside a paramiko client (Fabric's Connection);
``openssh_options`` makes OpenSSH apply it (StrictHostKeyChecking=yes over the same files).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core import ui
from kvmlab.core.errors import LabError
from kvmlab.core.settings import Settings

HOSTS_EXTRA_HINT = "pip install 'kvmlab[hosts]' (Fabric, paramiko and ansible-core)"
_TYPE_LABEL = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA",
               "ecdsa-sha2-nistp256": "ECDSA", "ecdsa-sha2-nistp384": "ECDSA",
               "ecdsa-sha2-nistp521": "ECDSA", "sk-ssh-ed25519@openssh.com": "ED25519-SK",
               "sk-ecdsa-sha2-nistp256@openssh.com": "ECDSA-SK"}
_record_lock = threading.Lock()


class HostKeyError(LabError):
    """A host key kvmlab refuses (unknown or changed)."""


class UnknownHostKey(HostKeyError):
    """The host is in no known_hosts file."""


class ChangedHostKey(HostKeyError):
    """The host is known with another key."""


class HostUnreachable(LabError):
    """No ssh handshake with the host (refused, timed out, not an ssh server)."""


def fingerprint(blob: bytes) -> str:
    """``SHA256:<base64 without padding>`` of a key's wire form, as ssh prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def type_label(keytype: str) -> str:
    return _TYPE_LABEL.get(keytype, keytype)


def host_name(address: str, port: int) -> str:
    """The name ssh looks a host up by in known_hosts."""
    return address if port == 22 else f"[{address}]:{port}"


@dataclass(frozen=True)
class KnownKey:
    file: Path
    line: int
    keytype: str
    blob: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _hashed_match(field: str, name: str) -> bool:
    try:
        salt_b64, digest_b64 = field[3:].split("|", 1)
        salt, digest = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def _glob(pattern: str, name: str) -> bool:
    """ssh's patterns: ``*`` and ``?`` only (``[`` is literal: ``[host]:port``)."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name) is not None


def _names_match(field: str, name: str) -> bool:
    if field.startswith("|1|"):
        return _hashed_match(field, name)
    hit = False
    for pat in field.split(","):
        negate = pat.startswith("!")
        if _glob(pat[1:] if negate else pat, name):
            if negate:
                return False
            hit = True
    return hit


def _parse_line(path: Path, n: int, line: str, name: str) -> KnownKey | None:
    fields = line.split()
    if len(fields) < 3 or fields[0].startswith("#") or fields[0].startswith("@"):
        return None
    if not _names_match(fields[0], name):
        return None
    try:
        blob = base64.b64decode(fields[2], validate=True)
    except (ValueError, binascii.Error):
        return None
    return KnownKey(path, n, fields[1], blob)


@dataclass(frozen=True)
class KnownHosts:
    """kvmlab's known_hosts (written) and the read-only ones after it."""
    own: Path
    read_only: tuple[Path, ...] = ()

    @classmethod
    def of(cls, settings: Settings) -> KnownHosts:
        return cls(settings.known_hosts, (settings.user_known_hosts,))

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.own, *self.read_only)

    def lookup(self, name: str) -> list[KnownKey]:
        """Every key listed for ``name`` (``[host]:port``), in file order."""
        found: list[KnownKey] = []
        for path in self.files:
            try:
                text = path.read_text(errors="replace")
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise LabError(f"cannot read known_hosts {path}: {e.strerror}",
                               hint="check the file's permissions") from None
            for n, line in enumerate(text.splitlines(), 1):
                k = _parse_line(path, n, line, name)
                if k is not None:
                    found.append(k)
        return found

    def record(self, name: str, keytype: str, blob: bytes) -> None:
        """Append ``name keytype base64`` to kvmlab's own known_hosts."""
        entry = f"{name} {keytype} {base64.b64encode(blob).decode()}\n"
        with _record_lock:
            self.own.parent.mkdir(parents=True, exist_ok=True)
            with open(self.own, "a", encoding="ascii") as f:
                f.write(entry)


def decide(kh: KnownHosts, label: str, address: str, port: int, keytype: str, blob: bytes,
           accept_new: bool) -> str:
    """Accept the key ``address:port`` offered, record it (accept_new), or raise HostKeyError.
    ``label``: the inventory's name for the host ("" for none). Returns what happened:
    ``known`` or ``recorded``."""
    name = host_name(address, port)
    known = kh.lookup(name)
    if any(k.keytype == keytype and k.blob == blob for k in known):
        return "known"
    who = name if label in ("", name) else f"{label} ({name})"
    offered = f"{type_label(keytype)} key {fingerprint(blob)}"
    if known:
        old = next((k for k in known if k.keytype == keytype), known[0])
        raise ChangedHostKey(
            f"REMOTE HOST IDENTIFICATION HAS CHANGED for {who}: it offers {offered}, "
            f"but {old.where} lists {type_label(old.keytype)} key {old.fingerprint}; refused "
            "(someone may be intercepting the connection, or the host was reinstalled)",
            hint=f"if you know why the key changed, delete line {old.line} of {old.file} "
                 f"(ssh-keygen -R '{name}' -f {old.file}) and re-run; --accept-new-host-keys "
                 "never replaces a known key")
    if not accept_new:
        raise UnknownHostKey(
            f"host key of {who} is unknown: {offered}; nothing was sent to it",
            hint="verify the fingerprint (on the host: ssh-keygen -lf "
                 f"/etc/ssh/ssh_host_{type_label(keytype).lower()}_key.pub) and re-run with "
                 f"--accept-new-host-keys, or add the key to {kh.own} or ~/.ssh/known_hosts")
    kh.record(name, keytype, blob)
    ui.info(f"recorded the host key of {who}: {offered}, in {kh.own}")
    return "recorded"


def _paramiko() -> Any:
    try:
        import paramiko  # the [hosts] extra: only ssh hosts need it
    except ImportError:
        raise LabError("ssh hosts need paramiko, which is not installed",
                       hint=HOSTS_EXTRA_HINT) from None
    return paramiko


def _preferred(known: list[KnownKey], offered: list[str]) -> list[str]:
    """The host key algorithms in the order ssh asks for them: the known types first."""
    first: list[str] = []
    for k in known:
        first += ["rsa-sha2-512", "rsa-sha2-256"] if k.keytype == "ssh-rsa" else [k.keytype]
    first = [t for t in dict.fromkeys(first) if t in offered]
    return first + [t for t in offered if t not in first]


def check_host(kh: KnownHosts, label: str, address: str, port: int, accept_new: bool,
               timeout: float = 10) -> str:
    """An ssh handshake with the host (no login, nothing run) and ``decide`` on its key;
    HostUnreachable when there is no handshake."""
    paramiko = _paramiko()
    known = kh.lookup(host_name(address, port))
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            t = paramiko.Transport(sock)
            try:
                t.banner_timeout = timeout
                opts = t.get_security_options()
                opts.key_types = _preferred(known, list(opts.key_types))
                t.start_client(timeout=timeout)
                key = t.get_remote_server_key()
            finally:
                t.close()
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise HostUnreachable(f"{label or address}: no ssh handshake with {address}:{port}: "
                              f"{type(e).__name__}: {e}".strip(),
                              hint="is sshd running there and the port right?") from None
    return decide(kh, label, address, port, key.get_name(), key.asbytes(), accept_new)


class Policy:
    """paramiko's missing-host-key policy doing ``decide`` (for hosts with no key loaded)."""

    def __init__(self, kh: KnownHosts, label: str, address: str, port: int, accept_new: bool):
        self.kh, self.label, self.address, self.port = kh, label, address, port
        self.accept_new = accept_new

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        decide(self.kh, self.label, self.address, self.port, key.get_name(), key.asbytes(),
               self.accept_new)


def prepare_client(client: Any, kh: KnownHosts, label: str, address: str, port: int,
                   accept_new: bool) -> None:
    """Make a paramiko SSHClient (e.g. Fabric's ``Connection.client``, which comes with
    AutoAddPolicy) check host keys as ``decide`` does: the host's known keys are loaded (so
    paramiko asks for their type and compares) and unknown hosts go to ``Policy``."""
    paramiko = _paramiko()
    name = host_name(address, port)
    store = client.get_host_keys()
    for k in kh.lookup(name):
        try:
            store.add(name, k.keytype, paramiko.PKey.from_type_string(k.keytype, k.blob))
        except (paramiko.SSHException, ValueError, TypeError):
            continue  # a key type paramiko does not know: it cannot match either
    client.set_missing_host_key_policy(Policy(kh, label, address, port, accept_new))


def changed_error(kh: KnownHosts, label: str, address: str, port: int,
                  exc: Any) -> HostKeyError:
    """paramiko's BadHostKeyException as kvmlab's ChangedHostKey (with file and line)."""
    key = exc.key
    try:
        decide(kh, label, address, port, key.get_name(), key.asbytes(), accept_new=False)
    except HostKeyError as e:
        return e
    return ChangedHostKey(f"host key of {label or host_name(address, port)} changed: {exc}",
                          hint="check the known_hosts files: " +
                               ", ".join(str(p) for p in kh.files))


def openssh_options(kh: KnownHosts) -> list[str]:
    """ssh_config lines making OpenSSH check keys as ``decide`` does (without recording: kvmlab
    records before ssh runs)."""
    files = " ".join(f'"{p}"' for p in kh.files)
    return ["StrictHostKeyChecking yes", f"UserKnownHostsFile {files}",
            "GlobalKnownHostsFile /dev/null", "UpdateHostKeys no", "CheckHostIP no"]
