"""fetch against a real HTTP server on 127.0.0.1 (tests/support/httpserver.py): resume, mirrors,
wrong bytes, timeouts, retries."""
import pytest

from kvmlab.core.errors import ChecksumError, FetchError
from kvmlab.source.fetch import FetchOptions, fetch_source
from support.fakeqemu import make_fake_qemu_tarball, sha256_file
from support.httpserver import LoopbackServer, free_port
from support.pipeline import cached_files, fake_project

FAST = FetchOptions(connect_timeout=2, read_timeout=0.5, retries=1, backoff=0, progress=False)


@pytest.fixture
def tarball(tmp_path):
    return make_fake_qemu_tarball(tmp_path / "dist")


@pytest.fixture
def server(tarball):
    with LoopbackServer({tarball.name: tarball.read_bytes()}) as srv:
        yield srv


def project(tmp_path, monkeypatch, tarball, server, *modes, sha="unknown"):
    urls = [server.url(m, tarball.name) if m != "refused" else
            f"http://127.0.0.1:{free_port()}/{tarball.name}" for m in modes]
    return fake_project(tmp_path, monkeypatch, tarball=tarball, urls=urls, sha256=sha)


def test_cut_connection_is_resumed_with_range(tmp_path, monkeypatch, kvmlab_env, tarball, server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "cut")
    res = fetch_source(s, r, options=FAST)
    assert res.sha256 == sha256_file(tarball) == sha256_file(res.path)
    half = tarball.stat().st_size // 2
    assert server.requests == [("cut", tarball.name, None, 200),
                               ("cut", tarball.name, f"bytes={half}-", 206)]


def test_part_file_from_an_earlier_run_is_resumed(tmp_path, monkeypatch, kvmlab_env, tarball,
                                                   server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "range")
    part = s.sources_cache / ".partial" / f"{tarball.name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(tarball.read_bytes()[:1000])
    res = fetch_source(s, r, options=FAST)
    assert res.sha256 == sha256_file(tarball) and not part.exists()
    assert server.requests == [("range", tarball.name, "bytes=1000-", 206)]


def test_server_ignoring_range_gets_a_full_download(tmp_path, monkeypatch, kvmlab_env, tarball,
                                                    server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "normal")
    part = s.sources_cache / ".partial" / f"{tarball.name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes from another attempt")
    assert fetch_source(s, r, options=FAST).sha256 == sha256_file(tarball)
    assert server.requests[0][3] == 200


def test_404_mirror_then_next(tmp_path, monkeypatch, kvmlab_env, tarball, server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "missing", "range")
    res = fetch_source(s, r, options=FAST)
    assert res.origin == server.url("range", tarball.name)
    assert [q[0] for q in server.requests] == ["missing", "range"]


def test_every_failure_is_reported_per_url(tmp_path, monkeypatch, kvmlab_env, tarball, server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "missing", "refused")
    with pytest.raises(FetchError) as e:
        fetch_source(s, r, options=FAST)
    msg = e.value.message
    assert f"{server.url('missing', tarball.name)}: HTTP 404" in msg
    assert "connection refused" in msg and "--source" in e.value.hint
    assert cached_files(s) == []


def test_wrong_bytes_hard_error_nothing_cached(tmp_path, monkeypatch, kvmlab_env, tarball, server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "wrong", "range",
                   sha=sha256_file(tarball))
    with pytest.raises(ChecksumError) as e:
        fetch_source(s, r, options=FAST)
    assert server.url("wrong", tarball.name) in e.value.message
    assert f"expected {sha256_file(tarball)} (pinned), got " in e.value.message
    assert [q[0] for q in server.requests] == ["wrong"]  # a mismatch never falls through
    assert cached_files(s) == []


def test_lock_on_first_use_then_mismatch_over_http(tmp_path, monkeypatch, kvmlab_env, tarball,
                                                   server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "range")
    first = fetch_source(s, r, options=FAST)
    assert first.check == "locked now"
    other = make_fake_qemu_tarball(tmp_path / "x", kvm_version="y")
    server.files[tarball.name] = other.read_bytes()
    with pytest.raises(ChecksumError, match=f"expected {first.sha256} \\(locked\\)"):
        fetch_source(s, r, force=True, options=FAST)
    assert fetch_source(s, r, options=FAST).status == "cached"  # the good copy is still there


def test_slow_server_times_out_with_the_url(tmp_path, monkeypatch, kvmlab_env, tarball, server):
    # the server would answer after 30 s; a hang would make the fetch succeed late and fail this
    s, r = project(tmp_path, monkeypatch, tarball, server, "slow")
    with pytest.raises(FetchError) as e:
        fetch_source(s, r, options=FAST)
    assert f"{server.url('slow', tarball.name)}: timed out: no data for 0.5s" in e.value.message


def test_503_is_retried_by_urllib3(tmp_path, monkeypatch, kvmlab_env, tarball, server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "flaky")
    assert fetch_source(s, r, options=FAST).sha256 == sha256_file(tarball)
    assert [q[3] for q in server.requests] == [503, 200]


def test_part_that_is_not_a_prefix_gets_416_and_starts_over(tmp_path, monkeypatch, kvmlab_env,
                                                            tarball, server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "range")
    part = s.sources_cache / ".partial" / f"{tarball.name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * (tarball.stat().st_size + 10))
    assert fetch_source(s, r, options=FAST).sha256 == sha256_file(tarball)
    assert [q[3] for q in server.requests] == [416, 200]


# -- stalled mirrors ------------------------------------------------------------------------------

def test_stalled_mirror_is_left_after_one_timeout_and_the_next_resumes(tmp_path, monkeypatch,
                                                                        kvmlab_env, tarball,
                                                                        server, capsys):
    # the stall mirror sends 10 bytes of the body, then nothing: one stall timeout, no Range
    # resume on it; the next mirror continues the .part from byte 10
    s, r = project(tmp_path, monkeypatch, tarball, server, "stall", "range")
    res = fetch_source(s, r, options=FAST)
    assert res.sha256 == sha256_file(tarball) == sha256_file(res.path)
    assert res.origin == server.url("range", tarball.name) and res.check == "locked now"
    assert server.requests == [("stall", tarball.name, None, 200),
                               ("range", tarball.name, "bytes=10-", 206)]
    err = capsys.readouterr().err.replace("\n", " ")
    assert "timed out: no data for 0.5s after 10 bytes; trying the next mirror" in err
    assert cached_files(s) == [f"{res.sha256}/{tarball.name}"]


def test_stalled_mirror_is_retried_only_after_the_others(tmp_path, monkeypatch, kvmlab_env,
                                                         tarball, server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "stall", "missing", "refused")
    with pytest.raises(FetchError) as e:
        fetch_source(s, r, options=FAST)
    stall = server.url("stall", tarball.name)
    # once, then the others (asked to resume), then once more (resuming what it sent first)
    assert [(q[0], q[2]) for q in server.requests] == [("stall", None), ("missing", "bytes=10-"),
                                                       ("stall", "bytes=10-")]
    msg = e.value.message
    assert f"{stall}: timed out: no data for 0.5s after 10 bytes" in msg
    assert f"{stall} (again): timed out: no data for 0.5s after 20 bytes" in msg
    assert "from any of its 3 URL(s)" in msg and "connection refused" in msg
    # what arrived is kept for the next run (resumed there with Range)
    assert cached_files(s) == [f".partial/{tarball.name}.part"]


def test_two_stalled_mirrors_alternate_once_each(tmp_path, monkeypatch, kvmlab_env, tarball,
                                                 server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "stall", "slow")
    with pytest.raises(FetchError):
        fetch_source(s, r, options=FAST)
    assert [q[0] for q in server.requests] == ["stall", "slow", "stall", "slow"]


def test_mirror_stalling_before_the_headers_is_not_retried_by_urllib3(tmp_path, monkeypatch,
                                                                      kvmlab_env, tarball,
                                                                      server):
    # "slow" answers nothing for 30 s: FAST has retries=1, which a timeout no longer uses
    s, r = project(tmp_path, monkeypatch, tarball, server, "slow", "range")
    res = fetch_source(s, r, options=FAST)
    assert res.origin == server.url("range", tarball.name)
    assert [(q[0], q[2]) for q in server.requests] == [("slow", None), ("range", None)]


# -- first download checked before it is locked; --relock ------------------------------------------

def test_mirror_serving_a_non_archive_is_skipped_before_locking(tmp_path, monkeypatch, kvmlab_env,
                                                                tarball, server, capsys):
    page = b"<!DOCTYPE html><html><body>Your download will start shortly...</body></html>\n"
    with LoopbackServer({tarball.name: page}) as html:
        urls = [html.url("normal", tarball.name), server.url("range", tarball.name)]
        s, r = fake_project(tmp_path, monkeypatch, tarball=tarball, urls=urls)
        res = fetch_source(s, r, options=FAST)
    assert res.sha256 == sha256_file(tarball) and res.origin == urls[1]
    assert server.requests == [("range", tarball.name, None, 200)]  # no Range from the page
    err = capsys.readouterr().err.replace("\n", " ")
    assert f"{urls[0]}: not used: {tarball.name} is not an archive kvmlab can unpack" in err
    assert cached_files(s) == [f"{res.sha256}/{tarball.name}"]


def test_relock_replaces_the_entry_after_upstream_changed(tmp_path, monkeypatch, kvmlab_env,
                                                          tarball, server):
    import json
    s, r = project(tmp_path, monkeypatch, tarball, server, "range")
    old = fetch_source(s, r, options=FAST).sha256
    new_tarball = make_fake_qemu_tarball(tmp_path / "rerolled", kvm_version="qemu-kvm-re-rolled")
    server.files[tarball.name] = new_tarball.read_bytes()
    with pytest.raises(ChecksumError) as e:
        fetch_source(s, r, force=True, options=FAST)
    assert f"expected {old} (locked), got {sha256_file(new_tarball)}" in e.value.message
    assert f"invoke fetch --recipe {r.name} --relock" in e.value.hint
    res = fetch_source(s, r, relock=True, options=FAST)
    assert (res.previous, res.sha256, res.check) == (old, sha256_file(new_tarball), "relocked")
    assert json.loads(s.lock.read_text())["sources"][f"{r.name}/{tarball.name}"]["sha256"] == \
        res.sha256
    assert fetch_source(s, r, options=FAST).status == "cached"


def test_relock_never_overrides_a_pin(tmp_path, monkeypatch, kvmlab_env, tarball, server):
    s, r = project(tmp_path, monkeypatch, tarball, server, "range", sha=sha256_file(tarball))
    with pytest.raises(FetchError) as e:
        fetch_source(s, r, relock=True, options=FAST)
    assert "never overrides a pin" in e.value.message and str(r.path) in e.value.message
    assert server.requests == [] and not s.lock.exists() and cached_files(s) == []


def test_mirror_giving_no_connection_is_left_after_one_connect_timeout(tmp_path, monkeypatch,
                                                                      kvmlab_env, tarball,
                                                                      server, caplog, capsys):
    from support.httpserver import Blackhole
    opts = FetchOptions(connect_timeout=0.5, read_timeout=0.5, retries=2, backoff=0,
                        progress=False)
    with Blackhole() as bh:
        urls = [bh.url(tarball.name), server.url("range", tarball.name)]
        s, r = fake_project(tmp_path, monkeypatch, tarball=tarball, urls=urls)
        with caplog.at_level("WARNING", logger="urllib3"):
            res = fetch_source(s, r, options=opts)
    assert res.origin == urls[1] and res.sha256 == sha256_file(tarball)
    assert f"{urls[0]}: no connection within 0.5s; trying the next mirror" in \
        capsys.readouterr().err.replace("\n", " ")
    assert not [m for m in caplog.messages if "Retrying" in m]  # urllib3 did not retry it


def test_a_single_stalled_mirror_is_tried_once_more(tmp_path, monkeypatch, kvmlab_env, tarball,
                                                    server, capsys):
    s, r = project(tmp_path, monkeypatch, tarball, server, "stall")
    with pytest.raises(FetchError):
        fetch_source(s, r, options=FAST)
    assert [(q[0], q[2]) for q in server.requests] == [("stall", None), ("stall", "bytes=10-")]
    assert "no other mirror left: trying it once more" in capsys.readouterr().err
