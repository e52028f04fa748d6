"""kvmlab.source.srpm on source RPMs written by the tests (tests/support/rpmgen.py): the RPM reader, the
cpio extraction's refusals, the spec's %prep order / -p levels / fuzz, missing patches."""
from __future__ import annotations

import shutil
import stat
import sys

import pytest

from kvmlab.source.spec import parse_spec
from kvmlab.source.srpm import SrpmError, extract_rpm, is_srpm, read_rpm
from kvmlab.source.unpack import unpack_srpm
from support.rpmgen import tarball, write_rpm, write_srpm

TREE = {"a.txt": "alpha\n", "sub/b.txt": "one\ntwo\nthree\n"}

# applied FIRST although numbered 2 (-p1)
P2 = """Fixes nothing, adds beta
--- a/a.txt
+++ b/a.txt
@@ -1 +1,2 @@
 alpha
+beta
"""
# applied second, needs P2's line; paths without a prefix: only -p0 finds them
P1 = """--- a.txt
+++ a.txt
@@ -1,2 +1,2 @@
 alpha
-beta
+BETA
"""
# two leading components: only -p2 finds sub/b.txt
P10 = """--- x/y/sub/b.txt
+++ x/y/sub/b.txt
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
"""
# its first context line is wrong: applies with fuzz 1, not with fuzz 0
FUZZY = """--- a/sub/b.txt
+++ b/sub/b.txt
@@ -1,3 +1,3 @@
 uno
-two
+TWO
 three
"""

SPEC = """\
%define base demo
%global ver 1.0
Name: %{base}
Version: %{ver}
Release: 3%{?dist}
Summary: test package
License: GPL
Source0: https://example.invalid/sources/%{name}-%{version}.tar.gz
Patch1: 0001-one.patch
Patch2: 0002-two.patch
Patch10: p10.patch
%if 0%{?rhel} >= 7
Patch11: not-for-el6.patch
%endif
BuildRequires: zlib-devel glib2-devel

%description
test

%prep
%setup -q -n %{name}-%{version}
# the order below is not the numeric one, and each patch has its own -p level
%patch2 -p1
%patch -P 1 -p0
%patch10 -p2
%if 0%{?rhel} >= 7
%patch11 -p1
%endif

%build
../configure --prefix=%{_prefix} \\
    --enable-foo \\
    --extra-cflags="$RPM_OPT_FLAGS -fPIE"
make %{?_smp_mflags}
"""


def _srpm(tmp_path, spec=SPEC, patches=None, compressor="gzip", **kw):
    files = {"demo-1.0.tar.gz": tarball(TREE, "demo-1.0")}
    files.update(patches if patches is not None else
                 {"0001-one.patch": P1, "0002-two.patch": P2, "p10.patch": P10})
    return write_srpm(tmp_path / "demo-1.0-3.src.rpm", spec, files, release="3",
                      compressor=compressor, **kw)


@pytest.mark.parametrize("comp", ["gzip", "xz", "bzip2", "zstd"])
def test_reads_lead_header_and_payload(tmp_path, comp):
    if comp == "zstd" and not shutil.which("zstd"):
        pytest.skip("zstd payloads need the zstd program (not installed here)")
    rpm = _srpm(tmp_path, compressor=comp)
    assert is_srpm(rpm)
    info = read_rpm(rpm)
    assert (info.name, info.version, info.release, info.compressor) == ("demo", "1.0", "3", comp)
    assert info.is_source
    _, names = extract_rpm(rpm, tmp_path / "x")
    assert sorted(names) == ["0001-one.patch", "0002-two.patch", "demo-1.0.tar.gz", "demo.spec",
                             "p10.patch"]
    assert (tmp_path / "x" / "p10.patch").read_text() == P10


def test_plain_tarball_is_not_an_srpm(tmp_path):
    t = tmp_path / "tree.tar.gz"
    t.write_bytes(tarball(TREE, "t"))
    assert not is_srpm(t)
    with pytest.raises(SrpmError, match="not an RPM file"):
        read_rpm(t)


def test_prep_order_and_levels_are_honoured(tmp_path):
    dest = tmp_path / "src"
    res = unpack_srpm(_srpm(tmp_path), dest)
    assert (dest / "a.txt").read_text() == "alpha\nBETA\n"        # P2 then P1 (-p0)
    assert (dest / "sub/b.txt").read_text() == "one\nTWO\nthree\n"  # P10 with -p2
    assert [(a["name"], a["number"], a["strip"], a["fuzz"]) for a in res.applied] == [
        ("0002-two.patch", 2, 1, 0), ("0001-one.patch", 1, 0, 0), ("p10.patch", 10, 2, 0)]
    assert res.spec.version == "1.0" and res.rpm.release == "3"
    assert res.spec.build_requires == ["zlib-devel glib2-devel"]
    assert res.spec.configure == ["../configure", "--prefix=/usr", "--enable-foo",
                                  "--extra-cflags=$RPM_OPT_FLAGS -fPIE"]


def test_numeric_order_would_fail_so_order_matters(tmp_path):
    spec = SPEC.replace("%patch2 -p1\n%patch -P 1 -p0\n", "%patch1 -p0\n%patch2 -p1\n")
    with pytest.raises(SrpmError, match=r"Patch1 \(0001-one.patch\) does not apply with -p0 -F0"):
        unpack_srpm(_srpm(tmp_path, spec=spec), tmp_path / "src")


def test_listed_but_missing_patch_is_a_clear_error(tmp_path):
    dest = tmp_path / "src"
    dest.mkdir()
    (dest / "keep").write_text("old tree")
    patches = {"0001-one.patch": P1, "0002-two.patch": P2}  # p10.patch left out
    with pytest.raises(SrpmError) as e:
        unpack_srpm(_srpm(tmp_path, patches=patches), dest)
    assert "Patch10 (p10.patch) is listed in the spec" in e.value.message
    assert "not in the source RPM" in e.value.message and "%patch10 -p2" in e.value.message
    assert e.value.hint
    assert (dest / "keep").read_text() == "old tree"  # the failed run left the old tree alone
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_patch_directive_without_patch_line(tmp_path):
    spec = SPEC.replace("%patch10 -p2\n", "%patch10 -p2\n%patch12 -p1\n")
    with pytest.raises(SrpmError, match="refers to Patch12, which no Patch12: line declares"):
        unpack_srpm(_srpm(tmp_path, spec=spec), tmp_path / "src")


def test_rpm_default_fuzz_is_zero_and_a_spec_may_raise_it(tmp_path):
    patches = {"0001-one.patch": P1, "0002-two.patch": P2, "p10.patch": FUZZY}
    spec = SPEC.replace("%patch10 -p2", "%patch10 -p1")
    with pytest.raises(SrpmError, match=r"Patch10 \(p10.patch\) does not apply with -p1 -F0"):
        unpack_srpm(_srpm(tmp_path, spec=spec, patches=patches), tmp_path / "src")
    spec2 = "%global _default_patch_fuzz 2\n" + spec
    res = unpack_srpm(_srpm(tmp_path, spec=spec2, patches=patches), tmp_path / "src")
    assert (tmp_path / "src/sub/b.txt").read_text() == "one\nTWO\nthree\n"
    assert res.applied[-1]["fuzz"] == 2


APPLYPATCH_SPEC = """\
Name: demo
Version: 1.0
Release: 1
Source0: demo-1.0.tar.gz
Patch1: 0002-two.patch
%prep
%setup -q
%define with_fuzzy_patches 0
%if %{with_fuzzy_patches}
  patch_command='patch -p1 -s'
%else
  patch_command='patch -p1 -F1 -s'
%endif
ApplyPatch()
{
  local patch=$1
  shift
  $patch_command ${1+"$@"} < "$RPM_SOURCE_DIR/$patch"
}
ApplyPatch 0002-two.patch
ApplyPatch fuzzy.patch
ApplyOptionalPatch local-extra.patch
"""


def test_applypatch_uses_the_specs_patch_command(tmp_path):
    rpm = _srpm(tmp_path, spec=APPLYPATCH_SPEC, patches={"0002-two.patch": P2,
                                                         "fuzzy.patch": FUZZY})
    res = unpack_srpm(rpm, tmp_path / "src")
    assert (tmp_path / "src/a.txt").read_text() == "alpha\nbeta\n"
    assert (tmp_path / "src/sub/b.txt").read_text() == "one\nTWO\nthree\n"  # needed fuzz 1
    assert [(a["name"], a["strip"], a["fuzz"]) for a in res.applied] == [
        ("0002-two.patch", 1, 1), ("fuzzy.patch", 1, 1)]
    assert res.skipped == ["local-extra.patch"]  # optional and absent
    assert "ApplyPatch()" in res.spec.ignored      # shell code is reported, never run


def test_applypatch_missing_file(tmp_path):
    rpm = _srpm(tmp_path, spec=APPLYPATCH_SPEC, patches={"0002-two.patch": P2})
    with pytest.raises(SrpmError, match=r"fuzzy.patch is listed in the spec \(line 21"):
        unpack_srpm(rpm, tmp_path / "src")


def test_autosetup_applies_every_patch_with_its_level(tmp_path):
    spec = """Name: demo
Version: 1.0
Release: 1
Source0: demo-1.0.tar.gz
Patch0: 0002-two.patch
Patch1: 0003-b.patch
%prep
%autosetup -p1
"""
    p3 = P10.replace("x/y/", "a/", 1).replace("x/y/", "b/", 1)
    res = unpack_srpm(_srpm(tmp_path, spec=spec, patches={"0002-two.patch": P2,
                                                          "0003-b.patch": p3}),
                      tmp_path / "src")
    assert [a["name"] for a in res.applied] == ["0002-two.patch", "0003-b.patch"]
    assert (tmp_path / "src/sub/b.txt").read_text() == "one\nTWO\nthree\n"


@pytest.mark.parametrize("member,kind", [
    ("../evil.txt", stat.S_IFREG), ("/tmp/kvmlab-evil-abs.txt", stat.S_IFREG),
    ("sub/../../evil.txt", stat.S_IFREG)])
def test_hostile_cpio_paths_are_refused(tmp_path, member, kind):
    rpm = write_rpm(tmp_path / "evil.src.rpm", name="evil", version="1", release="1",
                    members=[("ok.txt", "fine", stat.S_IFREG | 0o644),
                             (member, "pwned", kind | 0o644)])
    box = tmp_path / "box"
    box.mkdir()
    with pytest.raises(SrpmError, match="refusing cpio member"):
        extract_rpm(rpm, box / "out")
    assert not (tmp_path / "evil.txt").exists() and not (box / "evil.txt").exists()
    assert not (tmp_path / "kvmlab-evil-abs.txt").exists()


def test_links_leaving_the_tree_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for link in (str(outside), "../outside", "a/../../outside"):
        rpm = write_rpm(tmp_path / "l.src.rpm", name="l", version="1", release="1",
                        members=[("lnk", link, stat.S_IFLNK | 0o777),
                                 ("lnk/planted.txt", "pwned", stat.S_IFREG | 0o644)])
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        with pytest.raises(SrpmError, match="refusing cpio member 'lnk'"):
            extract_rpm(rpm, tmp_path / "out")
    assert list(outside.iterdir()) == []


def test_writing_through_an_inside_link_to_outside_is_impossible(tmp_path):
    # an inside link is fine, a file below it stays inside
    rpm = write_rpm(tmp_path / "ok.src.rpm", name="ok", version="1", release="1",
                    members=[("d", "", stat.S_IFDIR | 0o755), ("l", "d", stat.S_IFLNK | 0o777),
                             ("l/f.txt", "x", stat.S_IFREG | 0o644)])
    extract_rpm(rpm, tmp_path / "out")
    assert (tmp_path / "out/d/f.txt").read_text() == "x"


def test_device_files_are_refused(tmp_path):
    rpm = write_rpm(tmp_path / "dev.src.rpm", name="d", version="1", release="1",
                    members=[("null", "", stat.S_IFCHR | 0o666)])
    with pytest.raises(SrpmError, match="special file"):
        extract_rpm(rpm, tmp_path / "out")


def test_truncated_rpm(tmp_path):
    rpm = _srpm(tmp_path)
    data = rpm.read_bytes()
    rpm.write_bytes(data[:len(data) - 200])
    with pytest.raises(SrpmError):
        extract_rpm(rpm, tmp_path / "out")


def test_spec_macros_and_conditionals():
    spec = parse_spec("""\
%global have_spice 1
%define pkgrelease 2.491
%define zrelease 1
%define full_release %{pkgrelease}%{?dist}.%{zrelease}%{?buildid}
%bcond_without qemu_kvm
Name: qemu-kvm
Version: 0.12.1.2
Release: %{full_release}
Source0: http://example.invalid/qemu-kvm-%{version}.tar.gz
%if %{with qemu_kvm} && 0%{?have_spice}
Patch1: spice.patch
%else
Patch1: nospice.patch
%endif
%ifarch ppc64
Patch2: ppc.patch
%endif
%ifnarch ppc64
Patch3: x86.patch
%endif
%prep
%setup -q -n qemu-kvm-%{version}
%patch1 -p1
#%patch2 -p1
%patch3 -p1
""", defines={"dist": ".el6_8"})
    assert spec.release == "2.491.el6_8.1"
    assert spec.sources[0] == "qemu-kvm-0.12.1.2.tar.gz"
    assert spec.patches == {1: "spice.patch", 3: "x86.patch"}
    assert [s.number for s in spec.prep] == [1, 3]
    assert spec.setup["dir"] == "qemu-kvm-0.12.1.2"


def test_shell_substitutions_are_never_run(tmp_path):
    marker = tmp_path / "ran"
    spec = parse_spec(f"Name: %(touch {marker})x\nVersion: 1\n%prep\n%(touch {marker})\n")
    assert not marker.exists()
    assert spec.name == "x"


def test_rpm2cpio_fallback_when_python_cannot_decompress(tmp_path, monkeypatch):
    """zstd payload, no zstandard module and no zstd program: rpm2cpio does the decompressing."""
    rpm2cpio = shutil.which("rpm2cpio")
    if not rpm2cpio or not shutil.which("zstd"):
        pytest.skip("needs rpm2cpio and zstd (to write the payload) installed")
    rpm = _srpm(tmp_path, compressor="zstd")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "rpm2cpio").symlink_to(rpm2cpio)
    monkeypatch.setenv("PATH", str(bindir))       # no zstd program any more
    monkeypatch.setitem(sys.modules, "zstandard", None)  # and no Python module
    _, names = extract_rpm(rpm, tmp_path / "x")
    assert "p10.patch" in names and (tmp_path / "x/p10.patch").read_text() == P10
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SrpmError, match="neither Python nor an installed tool"):
        extract_rpm(rpm, tmp_path / "y")


def test_patch_without_p_gets_no_p_option_like_rpm(tmp_path):
    """rpm passes no -p when the spec gives none; patch(1) then uses the bare file name."""
    spec = SPEC.replace("%patch2 -p1\n", "%patch2\n")
    p2 = P2.replace("a/a.txt", "deep/dir/a.txt").replace("b/a.txt", "deep/dir/a.txt")
    res = unpack_srpm(_srpm(tmp_path, spec=spec, patches={"0001-one.patch": P1,
                                                          "0002-two.patch": p2,
                                                          "p10.patch": P10}), tmp_path / "src")
    assert res.applied[0]["strip"] is None
    assert (tmp_path / "src/a.txt").read_text() == "alpha\nBETA\n"
