"""What the notes say about routing: synthetic routing on a checkpoint that has trained weights
is the user's choice, not a missing checkpoint (issue 13)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def test_profile_note_for_synthetic_routing_on_a_trained_checkpoint(pydocs):
    from expertflow.registry import resolve_model
    from tuner.profiler import _routing_note

    spec = resolve_model(pydocs)
    assert spec.has_weights
    params, targets = SimpleNamespace(preset="qwen2_moe"), SimpleNamespace(source="test targets")
    note = _routing_note("synthetic", spec, 4, 100, params, targets)
    assert note.startswith("SYNTHETIC routing") and "no trained weights" not in note
    assert "has trained weights" in note and "--routing synthetic" in note
    alias = _routing_note("synthetic", resolve_model("tiny-qwen2-moe"), 4, 100, params, targets)
    assert "has no trained weights" in alias


@pytest.mark.parametrize("weights", [True, False])
def test_ef_tune_note_for_a_synthetic_profile(pydocs, tmp_path, weights):
    import _tuner_fixtures as fx

    from tuner import stages
    from tuner.request import Inputs, Target, TuneRequest, check

    name = str(pydocs) if weights else "tiny-qwen2-moe"
    prof = fx.make_profile(name, routing="synthetic").save(tmp_path / "profile")
    req = TuneRequest(Target(name, "1GB", device="cpu"), Inputs(out=tmp_path / "out", profile=prof))
    run = stages.Run(req, check(req))
    stages.profile(run)
    notes = run.notes
    (note,) = [n for n in notes if n.startswith("SYNTHETIC")]
    assert ("no trained weights" in note) is not weights
    assert ("has trained weights" in note) is weights
