"""Ansible inventories and ssh host-key checking against real sshd hosts (labhost containers on
127.0.0.1, each with its own host keys).

- an INI inventory with two groups ([db], [web]): `lab --hosts inv.ini --accept-new-host-keys`
  runs the host-side steps on both, the record names each host with its group; `verify --hosts`
  (INI, INV:GROUP, YAML) then runs real checks over ssh on them without the flag;
- an unknown key is refused before anything is built, pushed or run, with the fingerprint the
  container itself prints for its key;
- a changed key (the host's keys regenerated) is refused, even with --accept-new-host-keys.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.fakeqemu import make_fake_home, make_fake_qemu_tarball
from support.labhosts import lab_hosts

pytestmark = [pytest.mark.slow, pytest.mark.docker]
REPO = Path(__file__).resolve().parents[2]
REMOTE_ROOT = "/var/tmp/kvmlab-remote"
LAB = ["lab", "--builder", "debian12", "--prefix", "/opt/kvmlab",
       "--skip", "create-image,guest,boot-test"]


@pytest.fixture(scope="module")
def hosts2(tmp_path_factory):
    pytest.importorskip("fabric", reason="the [hosts] extra is not installed")
    pytest.importorskip("ansible", reason="the [hosts] extra is not installed")
    from kvmlab.build.images import docker_client
    from kvmlab.core.errors import DockerError
    from kvmlab.core.settings import load_settings
    try:
        docker_client()
    except DockerError as e:
        pytest.skip(f"dockerd is not running: {e.message}")
    tmp = tmp_path_factory.mktemp("hosts2")
    s = load_settings({"home": str(REPO), "state_dir": str(tmp / "state"),
                       "cache": str(tmp / "cache")})
    with lab_hosts(s, 2, tmp) as h:
        yield h


@pytest.fixture
def inv(hosts2, tmp_path):
    return hosts2.ansible_inventory(tmp_path / "inv.ini",
                                    {"db": [("db1", 0)], "web": [("web1", 1)]})


def _invoke(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "250", **(env or {})},
                          capture_output=True, text=True, timeout=1500)


def _last_two(r: subprocess.CompletedProcess) -> list[str]:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), r.stderr[-2000:]
    return lines[-2:]


def _pushed(hosts2, i: int) -> bool:
    return hosts2.containers[i].exec_run(["test", "-e", REMOTE_ROOT]).exit_code == 0


def test_unknown_host_key_is_refused_with_its_fingerprint(hosts2, inv, kvmlab_env, tmp_path,
                                                          monkeypatch):
    for i in (0, 1):
        hosts2.containers[i].exec_run(["rm", "-rf", REMOTE_ROOT])
    for k, v in make_fake_home(tmp_path / "home").items():
        monkeypatch.setenv(k, v)
    _pub, fp0 = hosts2.host_key(0)
    r = _invoke(*LAB, "--hosts", str(inv))
    assert r.returncode != 0
    error, hint = _last_two(r)
    assert f"ED25519 key {fp0}" in error and "db1" in error, error
    assert f"[127.0.0.1]:{hosts2.ports[0]}" in error
    assert "--accept-new-host-keys" in hint
    # refused before the build and before anything reached either host
    assert not (kvmlab_env.state_dir / "out").exists()
    assert not _pushed(hosts2, 0) and not _pushed(hosts2, 1)
    assert not kvmlab_env.known_hosts.exists()
    # verify refuses the same way (the web host alone: its own fingerprint)
    _pub, fp1 = hosts2.host_key(1)
    r = _invoke("verify", "--step", "install", "--hosts", f"{inv}:web")
    assert r.returncode != 0
    error, _hint = _last_two(r)
    assert f"ED25519 key {fp1}" in error and "web1" in error, error
    # and so does a plain ssh:// host (testinfra's ssh backend)
    r = _invoke("verify", "--step", "install", "--hosts",
                f"ssh://root@127.0.0.1:{hosts2.ports[1]}?ssh_identity_file={hosts2.key}")
    assert r.returncode != 0 and fp1 in _last_two(r)[0]


def test_two_groups_lab_then_verify_without_the_flag(hosts2, inv, kvmlab_env, tmp_path,
                                                     monkeypatch):
    tarball = make_fake_qemu_tarball(tmp_path / "dist")
    for k, v in make_fake_home(tmp_path / "home", tarball=tarball).items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    r = _invoke(*LAB, "--hosts", str(inv), "--accept-new-host-keys", "--json")
    took = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    doc = json.loads(r.stdout)
    got = {h["host"]: (h["groups"], h["ok"]) for h in doc["hosts"]}
    assert got == {f"db1 (root@127.0.0.1:{hosts2.ports[0]})": (["db"], True),
                   f"web1 (root@127.0.0.1:{hosts2.ports[1]})": (["web"], True)}, got
    print(f"lab --hosts (2 groups, build included): {took:.1f}s")
    # both keys recorded, exactly the containers' own
    recorded = kvmlab_env.known_hosts.read_text().splitlines()
    assert sorted(recorded) == sorted(f"[127.0.0.1]:{p} {hosts2.host_key(i)[0]}"
                                      for i, p in enumerate(hosts2.ports))
    for c in hosts2.containers:
        out = c.exec_run(["/opt/kvmlab/bin/qemu-system-x86_64", "-version"])
        assert out.exit_code == 0 and b"0.12.1" in out.output
    # the host's install manifest, checked over ssh on both hosts: no flag needed any more
    manifest = tmp_path / "install.json"
    ls = hosts2.containers[0].exec_run(["sh", "-c", f"ls {REMOTE_ROOT}/state/installs/*.json"])
    manifest.write_bytes(hosts2.containers[0].exec_run(
        ["cat", ls.output.decode().split()[0]]).output)
    env = {"KVMLAB_VERIFY_INSTALL_MANIFEST": str(manifest)}
    t0 = time.monotonic()
    r = _invoke("verify", "--step", "install", "--hosts", str(inv), "--json", env=env)
    print(f"verify --hosts (2 groups): {time.monotonic() - t0:.1f}s")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    doc = json.loads(r.stdout)
    assert [(h["host"], h["groups"]) for h in doc["hosts"]] == [("ssh://db1", ["db"]),
                                                                ("ssh://web1", ["web"])]
    passed = {(x["host"], tuple(x["groups"])) for x in doc["results"] if x["status"] == "passed"}
    assert passed == {("ssh://db1", ("db",)), ("ssh://web1", ("web",))}, doc["results"]
    # one group, and the same hosts from a YAML inventory
    r = _invoke("verify", "--step", "install", "--hosts", f"{inv}:web", "--json", env=env)
    assert r.returncode == 0 and {x["host"] for x in json.loads(r.stdout)["results"]} == \
        {"ssh://web1"}
    yml = hosts2.ansible_inventory(tmp_path / "inv.yml", {"db": [("db1", 0)],
                                                          "web": [("web1", 1)]})
    r = _invoke("verify", "--step", "install", "--hosts", f"{yml}:db", "--json", env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert {x["host"] for x in json.loads(r.stdout)["results"]} == {"ssh://db1"}


def test_openssh_itself_refuses_what_kvmlab_does_not_know(hosts2, inv, kvmlab_env, tmp_path):
    """The ssh_config kvmlab writes for testinfra's ssh backend makes OpenSSH strict too:
    with the key recorded ssh logs in; with the record gone ssh itself refuses."""
    from kvmlab.lab import verify
    cfg = tmp_path / "ssh_config"
    verify.resolve_hosts(kvmlab_env, [str(inv)], cfg, accept_new=True)
    ssh = ["ssh", "-F", str(cfg), "-o", "ControlPath=none", "db1", "true"]  # a new login each
    assert subprocess.run(ssh, capture_output=True, timeout=60).returncode == 0
    kvmlab_env.known_hosts.write_text("")
    r = subprocess.run(ssh, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Host key verification failed" in r.stderr, r.stderr


def test_changed_host_key_is_refused_even_with_the_flag(hosts2, inv, kvmlab_env, tmp_path,
                                                        monkeypatch):
    for k, v in make_fake_home(tmp_path / "home").items():
        monkeypatch.setenv(k, v)
    r = _invoke("verify", "--step", "install", "--hosts", str(inv), "--accept-new-host-keys")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    _pub, old = hosts2.host_key(0)
    hosts2.change_host_keys(0)
    _pub, new = hosts2.host_key(0)
    before = kvmlab_env.known_hosts.read_text()
    for args in (["verify", "--step", "install", "--hosts", str(inv)],
                 [*LAB, "--hosts", str(inv)]):
        r = _invoke(*args, "--accept-new-host-keys")
        assert r.returncode != 0
        error, hint = _last_two(r)
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in error and "db1" in error, error
        assert new in error and old in error, error
        line = next(n for n, ln in enumerate(before.splitlines(), 1)
                    if ln.startswith(f"[127.0.0.1]:{hosts2.ports[0]} "))
        assert f"{kvmlab_env.known_hosts}:{line}" in error
        assert f"line {line} of {kvmlab_env.known_hosts}" in hint
    assert kvmlab_env.known_hosts.read_text() == before   # nothing replaced, nothing added
    assert not (kvmlab_env.state_dir / "out").exists()


def test_fabric_connection_checks_keys_itself(hosts2, kvmlab_env, tmp_path):
    """Without the pre-check (a host that comes up later): Fabric's own connection refuses an
    unknown key and a changed one instead of its AutoAddPolicy, before anything is pushed."""
    from kvmlab.lab import remote
    from kvmlab.lab.inventory import HostSpec
    from kvmlab.lab.steps import LabOptions
    hosts2.containers[1].exec_run(["rm", "-rf", REMOTE_ROOT])
    h = HostSpec("127.0.0.1", "root", hosts2.ports[1], str(hosts2.key), name="web1",
                 groups=("web",))
    opts = LabOptions(recipe="fake-qemu", builder="debian12")
    pub, fp = hosts2.host_key(1)

    def run(accept_new: bool) -> remote.HostResult:
        return remote._run_one(kvmlab_env, opts, h, b"", b"", 10, 60, accept_new=accept_new)
    r = run(False)
    assert not r.ok and "is unknown" in r.summary and fp in r.summary, r.summary
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    kvmlab_env.known_hosts.write_text(f"[127.0.0.1]:{hosts2.ports[1]} {wrong}\n")
    r = run(True)
    assert not r.ok and "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.summary, r.summary
    assert fp in r.summary and f"{kvmlab_env.known_hosts}:1" in r.summary
    assert not _pushed(hosts2, 1)
    kvmlab_env.known_hosts.write_text("")
    run(True)   # accepted and recorded (the empty bundle then fails to unpack: not the point)
    assert kvmlab_env.known_hosts.read_text() == f"[127.0.0.1]:{hosts2.ports[1]} {pub}\n"


def test_unreachable_host_is_one_row_and_the_others_are_checked(hosts2, kvmlab_env, tmp_path):
    import socket
    with socket.socket() as s:      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    inv = hosts2.ansible_inventory(tmp_path / "inv.ini", {"web": [("web1", 1)]})
    inv.write_text(inv.read_text() + f"[gone]\ngone1 ansible_host=127.0.0.1 ansible_port={closed}"
                   " ansible_user=root\n")
    r = _invoke("verify", "--step", "fetch", "--hosts", str(inv), "--accept-new-host-keys",
                "--json")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    gone = [x for x in doc["results"] if x["host"] == "ssh://gone1"]
    assert [(x["step"], x["name"], x["status"]) for x in gone] == [("ssh", "reachable", "error")]
    assert f"127.0.0.1:{closed}" in gone[0]["message"] and gone[0]["groups"] == ["gone"]
    web = [x for x in doc["results"] if x["host"] == "ssh://web1"]
    assert web and all(x["step"] == "fetch" for x in web), doc["results"]   # checked over ssh
