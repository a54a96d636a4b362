"""An ef-tune output folder, loaded once for the report: tuning.json as a typed
`tuner.records.TuningRecord` (required: one DataError line when it is missing or does not
validate), profile/, the Optuna study (from the record's storage URL) and config.yaml. A
missing optional part leaves a note the report shows as a sentence."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertflow.errors import DataError
from tuner.profile import Profile
from tuner.records import TuningRecord

from . import data

log = logging.getLogger(__name__)


@dataclass
class OutputFolder:
    """What an ef-tune output folder holds, loaded once."""

    path: Path
    tuning: TuningRecord
    profile: Any = None  # tuner.profile.Profile, or None with `profile_note`
    profile_note: str | None = None
    study: Any = None  # optuna Study, or None with `study_note`
    study_note: str | None = None
    trials: list[dict] = field(default_factory=list)
    config_text: str | None = None


def load_output(out_dir: str | os.PathLike) -> OutputFolder:
    """The folder's parts; DataError (one line) when tuning.json is missing or is not a record."""
    d = Path(out_dir)
    run = OutputFolder(path=d, tuning=TuningRecord.load(d))
    pdir = Path(run.tuning.profile_dir or "profile")
    pdir = pdir if pdir.is_absolute() else d / pdir
    if pdir.is_dir():
        try:
            run.profile = Profile.load(pdir)
        except DataError as exc:
            run.profile_note = f"the profile could not be read: {exc}"
    else:
        run.profile_note = f"no profile folder at {pdir}; profile figures are left out."
    if run.profile_note:
        log.warning("%s", run.profile_note)
    run.study, run.study_note = data.load_study(run.tuning, d)
    if run.study_note:
        log.warning("%s", run.study_note)
    run.trials = data.study_trials(run.study)
    cfg = d / "config.yaml"
    run.config_text = cfg.read_text(encoding="utf-8") if cfg.is_file() else None
    return run
