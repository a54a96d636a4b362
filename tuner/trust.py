"""What a tuning run's numbers can be trusted for, said where the user reads them.

* Timing noise: a CPU profile records whether its timing was quiet enough to rank configs
  (tuner/profiler/robust.py defines the criterion; profile.yaml `timing.noise`); a noisy one
  becomes a WARNING note in ef-tune's output, `timing_noise` in tuning.json and a check in the
  report.
* Synthetic priors: with synthetic routing the profile's activation frequencies are the
  generator's (which expert ids it made popular), not the model's. The config therefore carries
  no `cache.priors`: no static pins, no demand allocation, no warm start from them, and the study
  simulates exactly that config (so its predictions are the exported config's); the policies
  that need priors leave the search space with a note.
"""

from __future__ import annotations

from .records import TimingNoise

SYNTHETIC_PRIORS_NOTE = (
    "routing is synthetic, so the profile's expert frequencies are the generator's, not this "
    "model's: config.yaml carries no cache.priors (no static pins, no demand allocation, no warm "
    "start from them; the cache learns which experts are hot while it runs), and the study "
    "simulated that same config")


def timing_noise(prof) -> TimingNoise | None:
    """The profile's timing-noise record (None: not assessed, e.g. bundled GPU tables)."""
    return prof.meta.timing.noise


def timing_note(noise: TimingNoise | None) -> str | None:
    """The WARNING note when the timing was too noisy to rank configs, else None."""
    if noise is None or not noise.noisy:
        return None
    why = "; ".join(noise.reasons or ["the spread criterion"])
    return (f"WARNING: timing too noisy to rank configs ({why}; the criterion is in the profile's "
            "profile.yaml, timing.noise): "
            "the predicted speeds, and which config is fastest, may change from run to run; "
            "re-profile with nothing else running on this machine, or tune for a bundled GPU "
            "with --hardware h200")


def config_priors(prof, rounded) -> list[list[float]] | None:
    """cache.priors for the base config: the profile's (rounded) with real routing, None with
    synthetic routing (see the module docstring)."""
    return None if prof.routing_kind == "synthetic" else rounded(prof.priors())


def without_prior_policies(space, base):
    """The space without the choices that need cache.priors, when the base config has none."""
    if base.cache.priors is not None:
        return space
    why = "it needs cache.priors, and synthetic routing gives none that are this model's"
    if "cache.policy" in space:
        space = space.restrict("cache.policy", tuple(c for c in space.params["cache.policy"].values()
                                                     if c != "static"), f"no static: {why}")
    if "cache.allocation" in space:
        space = space.restrict("cache.allocation", ("uniform",), f"uniform only: {why}")
    return space
