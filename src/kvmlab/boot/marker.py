"""The boot marker protocol: the line a test guest prints, its per-run nonce, its fact lines.

A guest proves it booted by printing ``KVMLAB-BOOT-OK nonce=<16 hex>`` on its serial console,
with the nonce of *this* run (cached guest images hold a placeholder of 16 ``X``, patched into a
per-run copy), and reports what it sees as ``KVMLAB-FACT key=value`` lines.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from kvmlab.core.errors import VMError

MARKER = "KVMLAB-BOOT-OK"
NONCE_LEN = 16
NONCE_PLACEHOLDER = b"X" * NONCE_LEN
FACT_PREFIX = "KVMLAB-FACT "


def new_nonce() -> str:
    return os.urandom(NONCE_LEN // 2).hex()


def marker_for(nonce: str) -> str:
    return f"{MARKER} nonce={nonce}"


def patch_nonce(src: Path, dst: Path, nonce: str) -> int:
    """Copy src to dst with every nonce placeholder replaced; returns how many were patched."""
    if len(nonce) != NONCE_LEN or not re.fullmatch(r"[0-9a-f]+", nonce):
        raise ValueError("nonce must be 16 lowercase hex digits")
    data = src.read_bytes()
    key = b"nonce=" + NONCE_PLACEHOLDER  # 'KVMLAB-BOOT-OK nonce=' (tiny), 'kvmlab.nonce=' (iso)
    n = data.count(key)
    if n == 0:
        raise VMError(f"{src} has no nonce placeholder", hint="rebuild it: invoke guest --force")
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data.replace(key, b"nonce=" + nonce.encode()))
    os.replace(tmp, dst)
    return n


def parse_facts(text: str) -> dict[str, str]:
    """{key: value} of the guest's ``KVMLAB-FACT key=value`` lines."""
    facts = {}
    for m in re.finditer(r"KVMLAB-FACT (\w+)=([^\r\n]*)", text):
        facts[m.group(1)] = m.group(2).strip()
    return facts
