"""Search spaces: strict validation (errors name the key), symbol resolution, suggest() bounds."""

from __future__ import annotations

import pytest
import yaml

from expertflow.errors import EXIT_CONFIG, ConfigError
from tuner.search_space import load_space, packaged_space, parse_space, suggest

SYMBOLS = {"budget": 20, "layers": 4, "experts": 8, "total": 32, "top_k": 2, "lookahead": 4}


def _space(params: dict, **top) -> dict:
    return {"version": 1, "params": params, **top}


def _err(data) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_space(data, source="space.yaml")
    assert "\n" not in str(info.value) and info.value.exit_code == EXIT_CONFIG
    return info.value


# ---- packaged files -----------------------------------------------------------------------------
def test_every_packaged_space_loads_and_resolves_for_each_real_alias():
    import search_spaces

    names = search_spaces.available()
    assert "default" in names
    for alias, sym in {"qwen2-moe": dict(budget=1038, layers=24, experts=60, total=1440, top_k=4),
                       "mixtral-8x7b": dict(budget=60, layers=32, experts=8, total=256, top_k=2),
                       "qwen3-30b-a3b": dict(budget=2000, layers=48, experts=128, total=6144, top_k=8),
                       "olmoe-1b-7b": dict(budget=900, layers=16, experts=64, total=1024, top_k=8),
                       "deepseek-v2-lite": dict(budget=900, layers=26, experts=64, total=1664, top_k=6)}.items():
        space = packaged_space(alias).resolve({**sym, "lookahead": 4})
        assert "adaptive_k.threshold" in space and "cache.capacity_experts" in space
        cap = space.params["cache.capacity_experts"]
        assert cap.low == sym["layers"] and cap.high == sym["budget"]
    for name in names:
        packaged_space(name)  # every packaged file validates


def test_model_specific_space_is_picked_and_unknown_model_falls_back_to_default():
    assert packaged_space("no-such-model").source.endswith("default.yaml")
    mix = packaged_space("mixtral-8x7b")
    assert mix.source.endswith("mixtral-8x7b.yaml")


# ---- errors name the key ------------------------------------------------------------------------
@pytest.mark.parametrize("params, key, words", [
    ({"cache.capacity": {"type": "int", "low": 1, "high": 4}}, "cache.capacity", "not a RuntimeConfig field"),
    ({"memory.budget_bytes": {"type": "int", "low": 1, "high": 4}}, "memory.budget_bytes", "cannot be searched"),
    ({"model.top_k": {"type": "int", "low": 1, "high": 4}}, "model.top_k", "cannot be searched"),
    ({"cache": {"type": "int", "low": 1, "high": 4}}, "cache", "section"),
    ({"adaptive_k.threshold": {"type": "float", "low": 0.0, "high": 1.0}}, "adaptive_k.threshold", "low 0.0"),
    ({"adaptive_k.threshold": {"type": "float", "low": 0.5, "high": 1.5}}, "adaptive_k.threshold", "high 1.5"),
    ({"prefetch.depth": {"type": "int", "low": 0, "high": 9}}, "prefetch.depth", "<= 8"),
    ({"prefetch.depth": {"type": "float", "low": 0, "high": 2}}, "prefetch.depth", "does not fit"),
    ({"cache.policy": {"type": "categorical", "choices": ["lru", "mru"]}}, "cache.policy", "'mru'"),
    ({"cache.policy": {"type": "int", "low": 0, "high": 2}}, "cache.policy", "does not fit"),
    ({"cache.policy": {"type": "categorical", "choices": []}}, "cache.policy", "non-empty"),
    ({"prefetch.adaptive": {"type": "categorical", "choices": [1, 0]}}, "prefetch.adaptive", "not a bool"),
    ({"prefetch.depth": {"type": "int", "low": 3, "high": 1}}, "prefetch.depth", "low 3 > high 1"),
    ({"prefetch.depth": {"type": "int", "low": 0, "high": "infinity"}}, "prefetch.depth", "symbol"),
    ({"prefetch.depth": {"type": "int", "low": 0}}, "prefetch.depth", "high is missing"),
    ({"prefetch.depth": {"type": "int", "low": 0, "high": 4, "size": 2}}, "prefetch.depth", "'size'"),
    ({"prefetch.depth": {"type": "integer", "low": 0, "high": 4}}, "prefetch.depth", "'integer'"),
    ({"prefetch.min_precision": {"type": "float", "low": 0.1, "high": 0.5, "log": True, "step": 0.1}},
     "prefetch.min_precision", "log and step"),
    ({"prefetch.depth": {"type": "int", "low": 0.5, "high": 4}}, "prefetch.depth", "not an integer"),
    ({"cache.priors": {"type": "categorical", "choices": [1]}}, "cache.priors", "cannot be searched"),
    ({"cache.expertflow.decay": {"type": "float", "low": 0.8, "high": 0.9, "when": {"prefetch.depth": 1}},
      "prefetch.depth": {"type": "int", "low": 0, "high": 2}}, "cache.expertflow.decay", "prefetch.depth"),
    ({"cache.expertflow.decay": {"type": "float", "low": 0.8, "high": 0.9, "when": {"cache.policy": "mru"}},
      "cache.policy": {"type": "categorical", "choices": ["lru", "expertflow"]}}, "cache.expertflow.decay", "'mru'"),
])
def test_validation_errors_name_the_key_and_value(params, key, words):
    err = _err(_space(params))
    assert f"'{key}'" in str(err) and words in str(err) and "space.yaml" in str(err)


def test_top_level_errors():
    assert "version" in str(_err({"version": 2, "params": {"prefetch.depth": {"type": "bool"}}}))
    assert "'params'" in str(_err({"version": 1, "params": {}}))
    assert "'extra'" in str(_err({"version": 1, "extra": 1, "params": {"prefetch.adaptive": {"type": "bool"}}}))
    assert "mapping" in str(_err(["not", "a", "mapping"]))


def test_symbolic_bounds_resolve_and_are_checked_against_the_model():
    s = parse_space(_space({"cache.capacity_experts": {"type": "int", "low": "layers", "high": "0.5*total"},
                            "adaptive_k.min_k": {"type": "int", "low": 1, "high": "top_k"}}))
    r = s.resolve(SYMBOLS)
    assert (r.params["cache.capacity_experts"].low, r.params["cache.capacity_experts"].high) == (4, 16)
    assert r.params["adaptive_k.min_k"].high == 2
    with pytest.raises(ConfigError, match="adaptive_k.min_k.*top_k"):
        parse_space(_space({"adaptive_k.min_k": {"type": "int", "low": 1, "high": 3}})).resolve(SYMBOLS)
    # a symbolic low above the budget's slots collapses to the budget, with a note
    tight = s.resolve({**SYMBOLS, "total": 6})
    p = tight.params["cache.capacity_experts"]
    assert p.low == p.high == 3 and any("cache.capacity_experts" in n for n in tight.notes)
    with pytest.raises(ConfigError, match="lookahead"):
        parse_space(_space({"prefetch.depth": {"type": "int", "low": 0, "high": "lookahead"}})).resolve({"budget": 1})


def test_load_space_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nparams: {prefetch.depth: {type: int, low: 0, high: [}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(_space({"prefetch.depth": {"type": "int", "low": 0, "high": 2}})))
    assert list(load_space(ok).params) == ["prefetch.depth"]


# ---- suggest ------------------------------------------------------------------------------------
def test_suggest_respects_bounds_steps_choices_and_conditions(tiny_config):
    import optuna

    from tuner.objective import trial_config

    space = packaged_space("tiny-qwen2-moe").resolve(SYMBOLS)
    base = tiny_config("tiny-qwen2-moe", values={"cache.priors": [[1.0] * 8] * 4})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_policies = set()
    for _ in range(60):
        trial = study.ask()
        values = suggest(trial, space)
        for key, v in values.items():
            assert space.params[key].contains(v), (key, v)
        thr = values["adaptive_k.threshold"]
        assert abs((thr - 0.5) / 0.05 - round((thr - 0.5) / 0.05)) < 1e-9  # on the 0.05 grid
        assert ("cache.expertflow.decay" in values) == (values["cache.policy"] == "expertflow")
        assert ("cache.allocation" in values) == (values["cache.scope"] == "per_layer")
        assert ("prefetch.min_precision" in values) == values["prefetch.adaptive"]
        seen_policies.add(values["cache.policy"])
        trial_config(base, values)  # every suggested point is a valid RuntimeConfig
        study.tell(trial, 0.0)
    assert seen_policies == {"lru", "lfu", "static", "expertflow"}


def test_defaults_from_config_and_grid(tiny_config):
    space = packaged_space().resolve(SYMBOLS)
    base = tiny_config("tiny-qwen2-moe")
    d = space.defaults_from(base)
    assert d["prefetch.width"] == 2  # width 0 means top_k
    assert d["cache.policy"] == "lru" and "cache.expertflow.decay" not in d
    grid = space.params["adaptive_k.threshold"].grid(6)
    assert grid[0] == 0.5 and grid[-1] == 1.0 and len(grid) == 6
    assert space.params["cache.capacity_experts"].grid(3) == [4, 12, 20]
    assert space.as_dict()["prefetch.adaptive"] == {"type": "categorical", "choices": [False, True]}
