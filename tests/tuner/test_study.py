"""The Optuna study: baselines first and never twice, constraints, failed trials, the choice."""

from __future__ import annotations

import math

import pytest

from expertflow.errors import BudgetError, ConfigError, StorageError
from tuner import export
from tuner.search_space import parse_space
from tuner.storage import make_storage, sqlite_url
from tuner.study import DEFAULT_BASELINE, LRU_BASELINE, StudyContext, baseline_values, run_study
from tuner.records import TrialRecord
from tuner.trials import MEMORY_CONSTRAINT, completed_trials, pareto_front

SPACE = {"version": 1, "params": {
    "adaptive_k.threshold": {"type": "float", "low": 0.6, "high": 1.0, "step": 0.1},
    "cache.capacity_experts": {"type": "int", "low": "layers", "high": "budget"},
    "cache.policy": {"type": "categorical", "choices": ["lru", "lfu", "expertflow"]},
    "prefetch.depth": {"type": "int", "low": 0, "high": 2},
}}


@pytest.fixture(scope="module")
def setup():
    """(spec, plan, profile, base config, costs) of tiny-qwen2-moe with a 20-slot budget."""
    import _tuner_fixtures as fx

    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.registry import resolve_model
    from tuner.simulator import Costs

    spec = resolve_model("tiny-qwen2-moe")
    big = plan_memory(spec, "1GB", max_context_tokens=256, prefill_chunk_tokens=64)
    fixed = big.non_expert_bytes + big.kv_cache_bytes + big.workspace_bytes
    budget = int((fixed + 20.5 * big.bytes_per_expert) / (1 - big.margin_fraction))
    plan = plan_memory(spec, budget, max_context_tokens=256, prefill_chunk_tokens=64)
    assert plan.capacity_experts == 20
    prof = fx.make_profile(spec.name)
    base = default_config(spec, plan, priors=prof.priors(), profile_id=prof.profile_id, routing="synthetic")
    costs = Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers)
    return spec, plan, prof, base, costs


def _ctx(setup, space=SPACE, symbols=None, **kw):
    spec, plan, prof, base, costs = setup
    sym = {"budget": plan.capacity_experts, "layers": 4, "experts": 8, "total": 32, "top_k": 2,
           "lookahead": prof.trace.lookahead, **(symbols or {})}
    s = parse_space(space).resolve(sym)
    return StudyContext(prof.trace, costs, base, s, max_decode_tokens=48, **kw)


def _run(ctx, setup, url, n, **kw):
    base = setup[3]
    return run_study(ctx, storage_url=url, name="s", n_trials=n, progress=False,
                     baselines=baseline_values(ctx.space, base, setup[1].capacity_experts), **kw)


def test_baselines_are_the_first_two_trials_and_not_reenqueued_on_resume(setup, tmp_path):
    ctx = _ctx(setup)
    url = sqlite_url(tmp_path / "study.sqlite3")
    run = _run(ctx, setup, url, 4, seed=3)
    t = run.study.trials
    assert [x.user_attrs.get("baseline") for x in t[:2]] == [DEFAULT_BASELINE, LRU_BASELINE]
    assert t[0].params == ctx.space.defaults_from(setup[3])
    assert t[1].params == {"adaptive_k.threshold": 1.0, "cache.capacity_experts": 20,
                           "cache.policy": "lru", "prefetch.depth": 0}
    with pytest.raises(StorageError, match="--resume"):
        _run(ctx, setup, url, 6)
    again = _run(ctx, setup, url, 7, resume=True, seed=3)
    assert again.ran == 3 and len(again.study.trials) == 7
    assert sum(1 for x in again.study.trials if x.user_attrs.get("baseline")) == 2
    done = _run(ctx, setup, url, 7, resume=True)  # already complete: nothing more runs
    assert done.ran == 0 and len(done.study.trials) == 7


def test_resume_with_another_search_space_is_refused(setup, tmp_path):
    url = sqlite_url(tmp_path / "s.sqlite3")
    _run(_ctx(setup), setup, url, 2, attrs={"search_space": {"a": 1}})
    with pytest.raises(StorageError, match="search_space"):
        _run(_ctx(setup), setup, url, 3, resume=True, attrs={"search_space": {"a": 2}})


def test_constraint_marks_over_budget_trials_infeasible(setup):
    space = {"version": 1, "params": {"cache.capacity_experts": {"type": "int", "low": 4, "high": "total"},
                                      "prefetch.depth": {"type": "int", "low": 0, "high": 1}}}
    ctx = _ctx(setup, space)
    run = _run(ctx, setup, "memory", 14, seed=0)
    trials = completed_trials(run.study)
    over = [t for t in trials if t.params["cache.capacity_experts"] > 20]
    under = [t for t in trials if t.params["cache.capacity_experts"] <= 20]
    assert over and under
    assert all(not t.feasible and t.constraints[MEMORY_CONSTRAINT] > 0 for t in over)
    assert all(t.feasible and t.constraints[MEMORY_CONSTRAINT] <= 0 for t in under)
    # the stretched budget only serves the simulation: the over-budget trials are faster, yet
    # the choice is feasible
    chosen = export.choose(trials, None)
    assert chosen.params["cache.capacity_experts"] <= 20
    assert max(t.values[0] for t in over) >= chosen.values[0]


def test_quality_cap_is_a_constraint(setup):
    ctx = _ctx(setup, quality_cap=0.01)
    run = _run(ctx, setup, "memory", 10, seed=1)
    for t in completed_trials(run.study):
        assert t.feasible == (t.metrics["quality_loss"] <= 0.01)
        assert ("quality_over_cap" in t.constraints)


def test_nan_and_raising_trials_fail_without_stopping_the_study(setup):
    from tuner.simulator import simulate

    calls = {"n": 0}

    def flaky(trace, costs, config, **kw):
        calls["n"] += 1
        res = simulate(trace, costs, config, **kw)
        if config.cache.policy == "lfu":
            res.metrics["decode_tokens_per_s"] = math.nan
        if config.cache.policy == "expertflow":
            raise RuntimeError("boom")
        return res

    import optuna

    ctx = _ctx(setup, simulate_fn=flaky)
    run = _run(ctx, setup, "memory", 12, seed=2)
    states = [t.state for t in run.study.trials]
    assert len(states) == 12
    failed = [t for t in run.study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(t.params["cache.policy"] in ("lfu", "expertflow") for t in failed)
    assert any("non-finite" in t.user_attrs.get("fail_reason", "") for t in failed) or \
        any("boom" in t.user_attrs.get("fail_reason", "") for t in failed)
    assert all(t.params["cache.policy"] == "lru" for t in run.study.trials
               if t.state == optuna.trial.TrialState.COMPLETE)


def test_two_worker_processes_share_sqlite_and_run_exactly_n_trials(setup, tmp_path):
    ctx = _ctx(setup)
    run = _run(ctx, setup, sqlite_url(tmp_path / "p.sqlite3"), 8, jobs=2)
    assert run.jobs == 2 and len(run.study.trials) == 8
    assert [t.user_attrs.get("baseline") for t in run.study.trials[:2]] == [DEFAULT_BASELINE, LRU_BASELINE]
    assert all(t.state.name == "COMPLETE" for t in run.study.trials)


def test_same_seed_same_trials(setup):
    a = _run(_ctx(setup), setup, "memory", 8, seed=5)
    b = _run(_ctx(setup), setup, "memory", 8, seed=5)
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]


def test_storage_errors_are_one_line(tmp_path):
    with pytest.raises(StorageError, match="cannot be used") as info:
        make_storage("nosuchdb://user@host/db")
    assert "\n" not in str(info.value)


# ---- the choice ---------------------------------------------------------------------------------
def _t(n, speed, loss, ok=True, mem=-0.1):
    return TrialRecord(number=n, params={"x": n}, values=[speed, loss],
                       metrics={"decode_tokens_per_s": speed, "quality_loss": loss},
                       constraints={MEMORY_CONSTRAINT: mem}, feasible=ok)


def test_chosen_is_the_fastest_feasible_within_the_cap():
    trials = [_t(0, 10.0, 0.0), _t(1, 30.0, 0.05), _t(2, 25.0, 0.01), _t(3, 40.0, 0.0, ok=False, mem=0.2),
              _t(4, 25.0, 0.005), _t(5, 24.0, 0.0)]
    assert export.choose(trials, 0.02).number == 4  # tie on speed: lower loss
    assert export.choose(trials, None).number == 1
    assert export.choose(trials, 0.0).number == 5
    assert [t.number for t in pareto_front(trials)] == [1, 4, 5]


def test_no_feasible_trial_says_what_to_relax():
    with pytest.raises(ConfigError, match="--max-quality-loss") as info:
        export.choose([_t(0, 10.0, 0.3), _t(1, 12.0, 0.2)], 0.01)
    assert "0.2" in str(info.value)
    with pytest.raises(BudgetError, match="--budget"):
        export.choose([_t(0, 10.0, 0.0, ok=False, mem=0.5)], 0.01)
    with pytest.raises(ConfigError, match="no completed trial"):
        export.choose([], 0.01)


def test_final_choice_rescores_the_baselines_too(tiny_config):
    """On the longer slice the default config may be faster than every finalist of the short
    one: the choice must not be a config predicted slower than what a user gets untuned."""
    from tuner.simulator import SimResult

    speed = {"lfu": 40.0, "expertflow": 38.0, "lru": 45.0}  # on the longer slice

    def sim(trace, costs, config, max_decode_tokens=None, **kw):
        return SimResult(metrics={"decode_tokens_per_s": speed[config.cache.policy], "quality_loss": 0.0,
                                  "peak_gpu_bytes": 0.0}, counters=None)

    ctx = StudyContext(None, None, tiny_config(), None, max_decode_tokens=16, simulate_fn=sim)

    def t(n, policy, study_speed, baseline=None):
        return TrialRecord(number=n, params={"cache.policy": policy}, values=[study_speed, 0.0], constraints={},
                           metrics={"decode_tokens_per_s": study_speed, "quality_loss": 0.0}, feasible=True,
                           baseline=baseline)

    trials = [t(0, "lru", 30.0, DEFAULT_BASELINE), t(2, "lfu", 50.0), t(3, "expertflow", 48.0), t(4, "lfu", 47.0)]
    chosen, scored = export.final_choice(ctx, trials, 0.02, finalists=2, max_decode_tokens=64)
    assert [s.number for s in scored] == [2, 3, 0]  # the two best, then the baseline
    assert chosen.number == 0 and chosen.metrics["decode_tokens_per_s"] == 45.0
    assert chosen.study_metrics["decode_tokens_per_s"] == 30.0
