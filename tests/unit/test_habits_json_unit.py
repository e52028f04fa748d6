"""The pure parts of issue 16's leftovers: every reporting task takes --json, check counts keep
skipped apart from passed, the doctor verdict record and which record `status` shows."""
from __future__ import annotations

import json

import pytest
from invoke.exceptions import ParseError

from kvmlab.host import verdict
from kvmlab.lab.verify import CheckResult, VerifyReport
from kvmlab.tasks import _flags, ns


def test_every_task_takes_json():
    # every task reports something (a table, a verdict, what it removed): all take --json
    missing = [t for t in sorted(ns.task_names)
               if not any("json" in a.names for a in ns[t].get_arguments())]
    assert not missing, f"tasks without --json: {missing}"


def _report(*statuses: tuple[str, str]) -> VerifyReport:
    return VerifyReport([CheckResult("local", "boot", f"test_{i}", st, msg)
                         for i, (st, msg) in enumerate(statuses)])


def test_check_counts_keep_skipped_apart():
    c = _report(("passed", ""), ("passed", ""), ("skipped", "no disk image"),
                             ("skipped", "Skipped: no disk image"), ("skipped", "no kvm")).counts()
    assert (c["passed"], c["failed"], c["skipped"]) == (2, 0, 3)
    assert c["skipped_reasons"] == ["no disk image", "no kvm"]
    assert c["summary"] == "2 passed, 3 skipped (no disk image; no kvm)"
    c = _report(("passed", ""), ("failed", "x"), ("error", "y")).counts()
    assert (c["passed"], c["failed"], c["skipped"], c["summary"]) == (1, 2, 0,
                                                                      "1 passed, 2 failed")
    assert _report(("passed", "")).counts()["summary"] == "1 passed"
    many = _report(*[("skipped", f"r{i}") for i in range(5)]).counts()
    assert many["summary"] == "0 passed, 5 skipped (r0; r1; r2; ...)"


class _Rep:
    verdict, usable = "KVM usable", True

    def facts(self):
        return {"verdict": self.verdict, "usable": self.usable, "cpu": {"vendor": "AMD"}}


def test_verdict_record_round_trip(tmp_path):
    assert verdict.read_record(tmp_path) is None
    p = verdict.write_record(tmp_path, _Rep(), "doctor")  # type: ignore[arg-type]
    assert p == tmp_path / "host" / "last-doctor.json"
    rec = verdict.read_record(tmp_path)
    assert rec is not None and rec["path"] == str(p)
    assert (rec["verdict"], rec["usable"], rec["source"]) == ("KVM usable", True, "doctor")
    assert rec["facts"]["cpu"] == {"vendor": "AMD"} and rec["time"].endswith("Z")
    p.write_text("{not json")
    assert verdict.read_record(tmp_path) is None
    p.write_text(json.dumps({"schema": 99, "verdict": "x"}))
    assert verdict.read_record(tmp_path) is None


def test_newest_record_wins():
    a = verdict.make_record(_Rep(), "doctor", now=1_700_000_000)  # type: ignore[arg-type]
    b = {**verdict.make_record(_Rep(), "lab", now=1_700_000_060)}  # type: ignore[arg-type]
    assert a["time"] == "2023-11-14T22:13:20Z"
    assert verdict.newest(a, b) is b and verdict.newest(b, a) is b
    assert verdict.newest(None, a) is a and verdict.newest(None, None) is None


@pytest.mark.parametrize("argv, emitted", [(["invoke", "status", "--json"], True),
                                          (["invoke", "status"], False)])
def test_json_refusal_is_one_document(monkeypatch, capsys, argv, emitted):
    monkeypatch.setattr("sys.argv", argv)
    e = ParseError("error: config file x.yaml: no such file\nhint: check the path")
    _flags.json_refusal(e)
    _flags.json_refusal(e)          # re-raised through another hook: still one document
    out = capsys.readouterr().out
    if not emitted:
        assert out == ""
        return
    assert json.loads(out) == {"error": "config file x.yaml: no such file",
                               "hint": "check the path"}
    _flags.json_refusal(ParseError("No idea what '--nope' is!"))
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"] == "No idea what '--nope' is!" and "--help" in doc["hint"]


def test_records_carry_one_utc_stamp_format():
    from kvmlab.core.records import utc_stamp
    assert utc_stamp(0) == "1970-01-01T00:00:00Z"
    assert utc_stamp(1714564800.9) == "2024-05-01T12:00:00Z"
