"""Lab hosts for multi-host tests and benchmarks: containers running sshd, published on 127.0.0.1."""
from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LabHosts:
    containers: list[Any]
    ports: list[int]
    key: Path
    extra: dict = field(default_factory=dict)

    def inventory(self, path: Path, count: int | None = None) -> Path:
        ports = self.ports[:count] if count else self.ports
        path.write_text("# lab hosts (containers on loopback)\n" + "".join(
            f"ssh://root@127.0.0.1:{p} key={self.key}\n" for p in ports))
        return path


def wait_ssh(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"sshd on 127.0.0.1:{port} did not answer")


@contextmanager
def lab_hosts(settings: Any, n: int, workdir: Path) -> Iterator[LabHosts]:
    """n containers from the labhost image (built locally on demand), removed afterwards."""
    from kvmlab.build.images import docker_client, ensure_image
    client = docker_client()
    img = ensure_image(settings, "labhost", quiet=True)
    key = workdir / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, timeout=30)
    pub = key.with_suffix(".pub").read_text().strip()
    tag = uuid.uuid4().hex[:8]
    containers: list[Any] = []
    try:
        for i in range(n):
            containers.append(client.containers.run(
                img.ref, detach=True, name=f"kvmlab-labhost-{tag}-{i}",
                environment={"AUTHORIZED_KEY": pub}, ports={"22/tcp": ("127.0.0.1", None)},
                labels={"io.kvmlab.test": "labhost"}))
        ports = []
        for c in containers:
            c.reload()
            port = int(c.ports["22/tcp"][0]["HostPort"])
            wait_ssh(port)
            ports.append(port)
        yield LabHosts(containers, ports, key)
    finally:
        for c in containers:
            try:
                c.remove(force=True)
            except Exception:
                pass
