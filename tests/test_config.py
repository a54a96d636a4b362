"""RuntimeConfig: lossless save -> load, strict one-line errors naming the key, JSON Schema."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertflow.config import (
    CONFIG_VERSION,
    RuntimeConfig,
    config_from_dict,
    config_json_schema,
    load_config,
    save_config,
)
from expertflow.errors import EXIT_CONFIG, ConfigError


@pytest.fixture(scope="module")
def base(tiny_config) -> RuntimeConfig:
    return tiny_config("tiny-qwen2-moe")


def _tuned(base: RuntimeConfig) -> RuntimeConfig:
    """A config with every section moved off its defaults (what ef-tune writes)."""
    L, E = base.model.num_moe_layers, base.model.num_experts
    priors = [[(i * E + j + 1) / 997.0 for j in range(E)] for i in range(L)]
    return base.with_values({
        "adaptive_k.threshold": 0.85, "adaptive_k.min_k": 2, "adaptive_k.renormalize": True,
        "cache.capacity_experts": 20, "cache.per_layer_capacity": [6, 5, 5, 4],
        "cache.policy": "expertflow", "cache.allocation": "demand", "cache.priors": priors,
        "cache.expertflow.freq_weight": 0.7, "cache.expertflow.decay": 0.9,
        "prefetch.depth": 3, "prefetch.adaptive": True, "prefetch.width": 2,
        "prefetch.bandwidth_gbps": 55.0, "prefetch.layer_time_ms": 0.125,
        "hardware.gpu_name": "NVIDIA H200", "hardware.pcie_generation": 5,
        "runtime.record_trace": True, "runtime.experts_kernel": "batched_mm",
        "provenance.study_name": "tiny-1GiB", "provenance.trial_number": 12,
        "provenance.routing": "synthetic",
        "provenance.predicted": {"decode_tokens_per_s": 20.125, "hit_rate": 0.8125, "tiny": 1e-12},
    })


# ---- round trip --------------------------------------------------------------------------------

def test_save_load_round_trip_is_lossless_and_text_stable(base, tmp_path):
    cfg = _tuned(base)
    path = save_config(cfg, tmp_path / "config.yaml")
    text = path.read_text()
    assert text.startswith("# ExpertFlow RuntimeConfig v1")
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.model_dump(mode="json") == cfg.model_dump(mode="json")
    # Saving what was loaded gives the same bytes (stable YAML: diffable, reviewable).
    again = save_config(loaded, tmp_path / "again.yaml").read_text()
    assert again == text
    # No temporary files are left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.yaml", "config.yaml"]


def test_round_trip_of_defaults(base, tmp_path):
    assert load_config(save_config(base, tmp_path / "c.yaml")) == base


_finite = st.floats(allow_nan=False, allow_infinity=True, width=64)
_names = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prior=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
       predicted=st.dictionaries(_names, _finite, max_size=4),
       name=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="\\"),
                    min_size=1, max_size=20))
def test_round_trip_exact_for_arbitrary_floats_and_strings(base, tmp_path, prior, predicted, name):
    L, E = base.model.num_moe_layers, base.model.num_experts
    cfg = base.with_values({"cache.priors": [[prior] * E for _ in range(L)],
                            "provenance.predicted": predicted, "model.name": name})
    path = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(path) == cfg


def test_with_values_validates_and_names_unknown_keys(base):
    assert base.with_values({"prefetch.depth": 2}).prefetch.depth == 2
    assert base.prefetch.depth == 1  # a copy: the original is unchanged
    with pytest.raises(ConfigError, match=r"prefetch\.deepness"):
        base.with_values({"prefetch.deepness": 2})
    with pytest.raises(ConfigError, match=r"prefetch\.depth"):
        base.with_values({"prefetch.depth": 9})


# ---- strict loading: each bad config names the dotted key ----------------------------------------

def _set(dotted: str, value):
    def mutate(d: dict) -> None:
        *parents, last = dotted.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return mutate


def _both(*mutations):
    def mutate(d: dict) -> None:
        for m in mutations:
            m(d)
    return mutate


def _drop(dotted: str):
    def mutate(d: dict) -> None:
        *parents, last = dotted.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    return mutate


BAD_CONFIGS = [
    # (id, mutation, key the message must name, a fragment of the value or rule it must show)
    ("unknown-top-level-key", _set("colour", "blue"), "colour", "allowed keys here"),
    ("unknown-nested-key", _set("cache.colour", 1), "cache.colour", "capacity_experts"),
    ("unknown-deep-key", _set("cache.expertflow.speed", 1), "cache.expertflow.speed", "decay"),
    ("wrong-type-str-for-int", _set("prefetch.depth", "2"), "prefetch.depth", "'2'"),
    ("wrong-type-float-for-int", _set("prefetch.depth", 2.5), "prefetch.depth", "2.5"),
    ("wrong-type-str-for-bool", _set("runtime.pin_memory", "yes"), "runtime.pin_memory", "'yes'"),
    ("bool-for-int", _set("cache.capacity_experts", True), "cache.capacity_experts", "True"),
    ("threshold-zero", _set("adaptive_k.threshold", 0.0), "adaptive_k.threshold", "greater than 0"),
    ("threshold-above-one", _set("adaptive_k.threshold", 1.5), "adaptive_k.threshold", "1.5"),
    ("min_k-above-top_k", _set("adaptive_k.min_k", 3), "adaptive_k.min_k", "top_k=2"),
    ("capacity-zero", _set("cache.capacity_experts", 0), "cache.capacity_experts", "got 0"),
    ("capacity-above-all-experts", _set("cache.capacity_experts", 33), "cache.capacity_experts",
     "32 experts"),
    ("per-layer-capacity-wrong-length", _set("cache.per_layer_capacity", [2, 2, 2]),
     "cache.per_layer_capacity", "4 integers"),
    ("per-layer-capacity-over-total",
     _both(_set("cache.capacity_experts", 20), _set("cache.per_layer_capacity", [8, 8, 8, 8])),
     "cache.per_layer_capacity", "at most cache.capacity_experts"),
    ("priors-wrong-rows", _set("cache.priors", [[0.1] * 8] * 3), "cache.priors", "4 rows of 8"),
    ("priors-wrong-width", _set("cache.priors", [[0.1] * 7] * 4), "cache.priors", "lengths [7]"),
    ("priors-negative", _set("cache.priors", [[-0.1] * 8] * 4), "cache.priors", "non-negative"),
    ("policy-static-without-priors", _set("cache.policy", "static"), "cache.policy", "priors"),
    ("policy-unknown", _set("cache.policy", "fifo"), "cache.policy", "'lru'"),
    ("device-gpu", _set("runtime.device", "gpu"), "runtime.device", "'gpu'"),
    ("device-cuda-x", _set("runtime.device", "cuda:x"), "runtime.device", "'cuda:x'"),
    ("dtype-unknown", _set("runtime.dtype", "int8"), "runtime.dtype", "'float32'"),
    ("prefetch-depth-too-deep", _set("prefetch.depth", 9), "prefetch.depth", "9"),
    ("margin-too-large", _set("memory.margin_fraction", 0.5), "memory.margin_fraction", "0.5"),
    ("fingerprint-malformed", _set("model.fingerprint", "abc"), "model.fingerprint", "'abc'"),
    ("version-2", _set("version", 2), "version", "got 2"),
    ("version-string", _set("version", "1"), "version", "'1'"),
    ("missing-required", _drop("cache.capacity_experts"), "cache.capacity_experts", "missing"),
    ("capacity-beyond-budget", _set("memory.expert_cache_bytes", 24576 * 5),
     "cache.capacity_experts", "expert_cache_bytes"),
]


@pytest.mark.parametrize("mutate,key,fragment", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_rejected_with_key_named(base, tmp_path, mutate, key, fragment):
    data = copy.deepcopy(base.model_dump(mode="json"))
    mutate(data)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"config key {key!r}" in msg, msg
    assert fragment in msg, msg
    assert info.value.exit_code == EXIT_CONFIG


def test_bad_config_list_has_at_least_ten_distinct_keys():
    assert len({c[2] for c in BAD_CONFIGS}) >= 10


def test_non_mapping_file_rejected(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"expected a mapping .* got list"):
        load_config(path)
    path.write_text("")  # an empty file is YAML null, not a config
    with pytest.raises(ConfigError, match=r"expected a mapping .* got NoneType"):
        load_config(path)


def test_invalid_yaml_reports_line_number(base, tmp_path):
    lines = base.to_yaml().splitlines()
    bad_line = 5
    lines[bad_line - 1] = "cache: {capacity_experts: [1, 2"
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "not valid YAML" in msg and "\n" not in msg
    line = int(msg.split("at line ")[1].split(",")[0])
    assert bad_line <= line <= bad_line + 1, msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot be read"):
        load_config(tmp_path)


def test_config_from_dict_accepts_dump(base):
    assert config_from_dict(base.model_dump(mode="json")) == base
    assert base.version == CONFIG_VERSION


# ---- JSON Schema -------------------------------------------------------------------------------

def test_json_schema_serialises_and_describes_every_section():
    schema = config_json_schema()
    text = json.dumps(schema)  # must be plain JSON
    assert json.loads(text) == schema
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False  # unknown keys are errors for editors too
    assert set(schema["properties"]) == set(RuntimeConfig.model_fields)
    assert set(schema["required"]) >= {"model", "cache", "memory", "provenance"}
    defs = schema["$defs"]
    for section in ("AdaptiveK", "Cache", "Prefetch", "Memory", "Runtime", "ModelIdentity"):
        assert defs[section]["additionalProperties"] is False, section
    threshold = defs["AdaptiveK"]["properties"]["threshold"]
    assert threshold["exclusiveMinimum"] == 0.0 and threshold["maximum"] == 1.0
    assert "description" in threshold


def test_json_schema_validates_a_saved_config(base):
    jsonschema = pytest.importorskip("jsonschema")
    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    data = _tuned(base).model_dump(mode="json")
    assert list(validator.iter_errors(data)) == []
    data["cache"]["colour"] = 1
    assert list(validator.iter_errors(data))
