"""The typed, versioned records of tuner/records.py: what crosses a stage or a file.

A record round-trips through its file unchanged; a file whose field was renamed (by a writer of
another version, by hand) is refused in one DataError line that names the field; an unknown
field is an error where a record is built, so a writer and its readers cannot drift apart."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from expertflow.errors import DataError
from tuner.profile import Profile
from tuner.records import ProfileTiming, TimingNoise, TrialRecord, TuningRecord

MODEL = "tiny-qwen2-moe"


def test_profile_meta_round_trips_through_profile_yaml(tmp_path):
    import _tuner_fixtures as fx

    prof = fx.make_profile(MODEL)
    prof.meta.timing.noise = TimingNoise(criterion="c", threshold_rel_iqr=0.25, noisy=True, reasons=["r"])
    back = Profile.load(prof.save(tmp_path / "p"))
    assert back.meta.model_dump(exclude={"files"}) == prof.meta.model_dump(exclude={"files"})
    assert back.meta.files["trace"] == "trace.npz" and back.meta.timing.noise.reasons == ["r"]


@pytest.mark.parametrize("section,old,new", [("routing", "kind", "routing_kind"), ("model", "fingerprint", "fp")])
def test_a_renamed_profile_field_is_one_data_error_naming_it(tmp_path, section, old, new):
    import _tuner_fixtures as fx

    d = fx.make_profile(MODEL).save(tmp_path / "p")
    meta = yaml.safe_load((d / "profile.yaml").read_text())
    meta[section][new] = meta[section].pop(old)
    (d / "profile.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DataError) as info:
        Profile.load(d)
    msg = str(info.value)
    assert "\n" not in msg and f"{section}.{old}" in msg and "re-run ef-profile" in msg


def test_tuning_record_round_trips_and_refuses_a_renamed_field_in_one_line(tmp_path):
    import _tuner_fixtures as fx

    from efcli.tune import main as tune_main

    prof = fx.make_profile(MODEL).save(tmp_path / "profile")
    out = tmp_path / "out"
    assert tune_main(["--model", MODEL, "--budget", "1GB", "--profile", str(prof), "--out", str(out),
                      "--trials", "3", "--no-report"]) == 0
    rec = TuningRecord.load(out)
    assert TuningRecord.model_validate_json(rec.to_json()) == rec
    raw = json.loads((out / "tuning.json").read_text())
    raw["chosen"]["prediction"] = raw["chosen"].pop("predicted")
    (out / "tuning.json").write_text(json.dumps(raw))
    with pytest.raises(DataError) as info:
        TuningRecord.load(out)
    assert "\n" not in str(info.value) and "chosen.predicted" in str(info.value)


def test_records_refuse_unknown_fields_where_they_are_built():
    with pytest.raises(ValidationError, match="extra"):
        TrialRecord(number=1, params={}, values=[1.0, 0.0], metrics={}, constraints={}, feasible=True, feasable=True)
    with pytest.raises(ValidationError, match="extra"):
        ProfileTiming(kind="measured-cpu", noise_verdict=None)
    t = TrialRecord(number=1, params={}, values=[1.0, 0.0], metrics={}, constraints={}, feasible=True)
    with pytest.raises(ValidationError):
        t.feasible = "maybe"  # assignments are checked too
