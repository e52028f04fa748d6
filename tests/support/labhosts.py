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

    def ansible_inventory(self, path: Path, groups: dict[str, list[tuple[str, int]]]) -> Path:
        """An Ansible inventory: group -> [(host name, container index)]; INI unless path ends
        in .yml/.yaml."""
        def hv(i: int) -> dict[str, object]:
            return {"ansible_host": "127.0.0.1", "ansible_port": self.ports[i],
                    "ansible_user": "root", "ansible_ssh_private_key_file": str(self.key)}
        if path.suffix in (".yml", ".yaml"):
            import yaml
            doc = {"all": {"children": {g: {"hosts": {n: hv(i) for n, i in members}}
                                        for g, members in groups.items()}}}
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            return path
        lines = []
        for g, members in groups.items():
            lines.append(f"[{g}]")
            lines += [n + "".join(f" {k}={v}" for k, v in hv(i).items()) for n, i in members]
            lines.append("")
        path.write_text("\n".join(lines))
        return path

    def host_key(self, i: int, kind: str = "ed25519") -> tuple[str, str]:
        """(public key line 'type base64', SHA256 fingerprint) of container i's host key, as
        the container itself says (ssh-keygen -lf there)."""
        pub = f"/etc/ssh/ssh_host_{kind}_key.pub"
        line = self.containers[i].exec_run(["cat", pub]).output.decode().split()
        r = self.containers[i].exec_run(["ssh-keygen", "-lf", pub])
        assert r.exit_code == 0, r.output
        return " ".join(line[:2]), r.output.decode().split()[1]

    def change_host_keys(self, i: int) -> None:
        """New host keys for container i (a reinstalled machine, or someone in the middle):
        regenerated, and sshd re-reads them (SIGHUP); returns once it serves the new one."""
        old = self.host_key(i)[0]
        r = self.containers[i].exec_run(["sh", "-c", "rm -f /etc/ssh/ssh_host_* && "
                                         "ssh-keygen -A >/dev/null && kill -HUP 1"])
        assert r.exit_code == 0, r.output
        new = self.host_key(i)[0]
        assert new != old
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            scan = subprocess.run(["ssh-keyscan", "-T", "2", "-t", "ed25519", "-p",
                                   str(self.ports[i]), "127.0.0.1"], capture_output=True,
                                  text=True, timeout=30).stdout
            if new in scan:
                return
            time.sleep(0.2)
        raise TimeoutError(f"container {i} does not serve its new host key")


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
