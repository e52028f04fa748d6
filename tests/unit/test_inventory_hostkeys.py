"""Inventories -> hosts (kvmlab's lists, Ansible INI/YAML read by ansible-inventory itself,
FILE:PATTERN), and the host-key decision (known / unknown / recorded / changed) with
fingerprints as ssh-keygen prints them, hashed and pattern known_hosts entries."""
from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlab.core.errors import LabError
from kvmlab.lab import hostkeys
from kvmlab.lab.hostkeys import ChangedHostKey, KnownHosts, UnknownHostKey
from kvmlab.lab.inventory import load_hosts, split_value

needs_ansible = pytest.mark.skipif(importlib.util.find_spec("ansible") is None,
                                   reason="ansible-core is not installed (pip install "
                                          "'kvmlab[hosts]')")

INI = """\
[db]
db1 ansible_host=127.0.0.1 ansible_port=2201 ansible_ssh_private_key_file=~/k

[web]
web[1:2] ansible_host=127.0.0.2

[web:vars]
ansible_user=admin
ansible_port=2202

[labs:children]
db
web

[ctl]
here ansible_connection=local
box ansible_connection=docker ansible_host=kvmlab-c1
"""

YAML = """\
all:
  children:
    labs:
      children:
        db:
          hosts:
            db1: {ansible_ssh_host: 10.0.0.1, ansible_ssh_port: 22, ansible_ssh_user: ops}
        web:
          hosts:
            web1:
              ansible_host: 10.0.0.2
"""


def _rows(hosts):
    return [(h.name, h.address, h.port, h.user, h.key, h.groups, h.connection) for h in hosts]


@needs_ansible
def test_ini_groups_children_ranges_and_vars(tmp_path):
    inv = tmp_path / "inv.ini"
    inv.write_text(INI)
    home = str(Path.home())
    assert _rows(load_hosts(str(inv))) == [
        ("box", "kvmlab-c1", 22, "root", None, ("ctl",), "docker"),
        ("db1", "127.0.0.1", 2201, "root", f"{home}/k", ("db", "labs"), "ssh"),
        ("here", "here", 22, "root", None, ("ctl",), "local"),
        ("web1", "127.0.0.2", 2202, "admin", None, ("labs", "web"), "ssh"),
        ("web2", "127.0.0.2", 2202, "admin", None, ("labs", "web"), "ssh")]
    assert [h.label for h in load_hosts(f"{inv}:db")] == ["db1 (root@127.0.0.1:2201)"]
    assert [h.name for h in load_hosts(f"{inv}:labs:!db")] == ["web1", "web2"]
    assert [h.name for h in load_hosts(f"{inv}:db:web1")] == ["db1", "web1"]


@needs_ansible
def test_yaml_inventory_and_older_ssh_vars(tmp_path):
    inv = tmp_path / "inv.yml"
    inv.write_text(YAML)
    assert _rows(load_hosts(str(inv))) == [
        ("db1", "10.0.0.1", 22, "ops", None, ("db", "labs"), "ssh"),
        ("web1", "10.0.0.2", 22, "root", None, ("labs", "web"), "ssh")]


@needs_ansible
def test_ini_without_suffix_is_sniffed_as_ansible(tmp_path):
    inv = tmp_path / "hosts"
    inv.write_text("[db]\n127.0.0.1 ansible_port=2201\n")
    (h,) = load_hosts(str(inv))
    assert (h.address, h.port, h.groups) == ("127.0.0.1", 2201, ("db",))


@needs_ansible
@pytest.mark.parametrize("text, value, needle", [
    ("[db\nfoo\n", "", "Ansible cannot read it"),
    ("[db]\nh1 ansible_port=abc\n", "", "not a port number"),
    ("[db]\nh1 ansible_connection=winrm\n", "", "ansible_connection=winrm"),
    ("[db]\n", "", "names no hosts"),
    ("[db]\nh1\n[web]\nh2\n", ":nope", "matches no host"),
])
def test_ansible_inventory_errors(tmp_path, text, value, needle):
    inv = tmp_path / "inv.ini"
    inv.write_text(text)
    with pytest.raises(LabError) as e:
        load_hosts(f"{inv}{value}")
    assert needle in e.value.message, e.value.message
    if value == ":nope":
        assert "db, web" in (e.value.hint or "")


def test_pattern_on_a_kvmlab_list_and_missing_file(tmp_path):
    p = tmp_path / "hosts.txt"
    p.write_text("ssh://root@127.0.0.1:2201\n")
    with pytest.raises(LabError, match="kvmlab host list"):
        load_hosts(f"{p}:db")
    with pytest.raises(LabError, match="no such file"):
        load_hosts(str(tmp_path / "nope.ini"))
    # the file part is the longest prefix that exists
    odd = tmp_path / "a:b.ini"
    odd.write_text("[g]\nh\n")
    assert split_value(f"{odd}:g") == (odd, "g")
    assert split_value(str(odd)) == (odd, None)


# ---------------------------------------------------------------------------------------------
# host keys


@pytest.fixture
def key(tmp_path):
    k = tmp_path / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
    typ, b64 = k.with_suffix(".pub").read_text().split()[:2]
    fp = subprocess.run(["ssh-keygen", "-lf", str(k.with_suffix(".pub"))], check=True,
                        capture_output=True, text=True).stdout.split()[1]
    return typ, base64.b64decode(b64), fp


def test_fingerprint_is_what_ssh_keygen_prints(key):
    typ, blob, fp = key
    assert typ == "ssh-ed25519" and hostkeys.fingerprint(blob) == fp


def test_unknown_refused_then_recorded_then_known(tmp_path, key):
    typ, blob, fp = key
    kh = KnownHosts(tmp_path / "kvmlab_known_hosts", (tmp_path / "user_known_hosts",))
    with pytest.raises(UnknownHostKey) as e:
        hostkeys.decide(kh, "db1", "127.0.0.1", 2201, typ, blob, accept_new=False)
    assert f"ED25519 key {fp}" in e.value.message and "[127.0.0.1]:2201" in e.value.message
    assert "--accept-new-host-keys" in e.value.hint
    assert not kh.own.exists()
    assert hostkeys.decide(kh, "db1", "127.0.0.1", 2201, typ, blob, True) == "recorded"
    assert kh.own.read_text().startswith(f"[127.0.0.1]:2201 {typ} ")
    assert hostkeys.decide(kh, "db1", "127.0.0.1", 2201, typ, blob, False) == "known"
    # port 22 is the bare name, and another port is another host
    with pytest.raises(UnknownHostKey):
        hostkeys.decide(kh, "db1", "127.0.0.1", 22, typ, blob, False)


def test_changed_key_is_refused_even_with_accept_new(tmp_path, key):
    typ, blob, fp = key
    user = tmp_path / "user_known_hosts"
    user.write_text("# mine\nother ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==\n"
                    f"[10.0.0.9]:2222 {typ} {base64.b64encode(b'x' * 51).decode()}\n")
    kh = KnownHosts(tmp_path / "kvmlab_known_hosts", (user,))
    with pytest.raises(ChangedHostKey) as e:
        hostkeys.decide(kh, "web1", "10.0.0.9", 2222, typ, blob, accept_new=True)
    msg = e.value.message
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in msg and fp in msg
    assert f"{user}:3" in msg and hostkeys.fingerprint(b"x" * 51) in msg
    assert "line 3" in e.value.hint
    assert not kh.own.exists()


def test_hashed_and_pattern_entries(tmp_path, key):
    typ, blob, _fp = key
    f = tmp_path / "known_hosts"
    f.write_text(f"[127.0.0.1]:2201 {typ} {base64.b64encode(blob).decode()}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(f)], check=True, capture_output=True)
    assert f.read_text().startswith("|1|")
    kh = KnownHosts(tmp_path / "own", (f,))
    assert hostkeys.decide(kh, "x", "127.0.0.1", 2201, typ, blob, False) == "known"
    p = tmp_path / "patterns"
    p.write_text(f"*.lab,!bad.lab {typ} {base64.b64encode(blob).decode()}\n")
    kh = KnownHosts(tmp_path / "own", (p,))
    assert hostkeys.decide(kh, "x", "a.lab", 22, typ, blob, False) == "known"
    with pytest.raises(UnknownHostKey):
        hostkeys.decide(kh, "x", "bad.lab", 22, typ, blob, False)


def test_openssh_options_name_both_files(tmp_path):
    kh = KnownHosts(tmp_path / "own", (tmp_path / "user",))
    opts = hostkeys.openssh_options(kh)
    assert "StrictHostKeyChecking yes" in opts
    assert f'UserKnownHostsFile "{tmp_path / "own"}" "{tmp_path / "user"}"' in opts


# ---------------------------------------------------------------------------------------------
# without the [hosts] extra


def test_core_imports_no_ssh_or_ansible_package():
    code = ("import sys, kvmlab.cli, kvmlab.tasks, kvmlab.lab.remote, kvmlab.lab.verify; "
            "print(sorted(m for m in ('fabric', 'paramiko', 'ansible') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_missing_extra_is_one_error_naming_it(tmp_path, monkeypatch):
    from kvmlab.lab import inventory, remote
    monkeypatch.setitem(sys.modules, "paramiko", None)   # import paramiko -> ImportError
    monkeypatch.setitem(sys.modules, "fabric", None)
    kh = KnownHosts(tmp_path / "own")
    with pytest.raises(LabError) as e:
        hostkeys.check_host(kh, "h", "127.0.0.1", 9, accept_new=False)
    assert "kvmlab[hosts]" in e.value.hint
    with pytest.raises(LabError) as e:
        remote._fabric()
    assert "kvmlab[hosts]" in e.value.hint
    monkeypatch.setattr(inventory.importlib.util, "find_spec", lambda name: None)
    inv = tmp_path / "inv.ini"
    inv.write_text("[db]\nh1\n")
    with pytest.raises(LabError) as e:
        load_hosts(str(inv))
    assert "ansible-core is not installed" in e.value.message and "kvmlab[hosts]" in e.value.hint


@needs_ansible
def test_verify_specs_from_an_inventory_and_own_ssh_config_left_alone(tmp_path):
    from kvmlab.core.settings import load_settings
    from kvmlab.lab import verify
    inv = tmp_path / "inv.ini"
    inv.write_text("[ctl]\nhere ansible_connection=local\n"
                   "[boxes]\nbox ansible_connection=docker ansible_host=kvmlab-c1\n")
    s = load_settings({"state_dir": str(tmp_path / "state")})
    own = "ssh://root@127.0.0.1:9?ssh_config=/x/ssh_config"   # never contacted: its file rules
    cfg = tmp_path / "ssh_config"
    t = verify.resolve_hosts(s, [str(inv), own], cfg)
    assert t.specs == ["docker://kvmlab-c1", "local://", own]
    assert t.groups == {"docker://kvmlab-c1": ["boxes"], "local://": ["ctl"]}
    assert t.keys == [] and "StrictHostKeyChecking yes" in cfg.read_text()
