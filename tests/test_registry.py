"""Model registry: real dims per alias, local checkpoint directories, one-line errors."""

from __future__ import annotations

import json

import pytest

from expertflow.errors import EXIT_MODEL, ModelError
from expertflow.registry import SUPPORTED_ARCHITECTURES, known_models, resolve_model

REAL = [n for n in known_models() if not resolve_model(n).tiny]
TINY = [n for n in known_models() if resolve_model(n).tiny]

# anchors.md "Model dims (bf16)": MoE layers, E, k, MiB per expert, GiB of non-expert weights.
ANCHOR_DIMS = {
    "qwen2-moe": (24, 60, 4, 16.5, 3.46),
    "qwen2-57b-a14b": (28, 64, 8, 52.5, 15.1),
    "mixtral-8x7b": (32, 8, 2, 336, 3.0),
    "olmoe-1b-7b": (16, 64, 8, 12, 0.89),
    "qwen3-30b-a3b": (48, 128, 8, 9, 2.87),
    "deepseek-v2-lite": (26, 64, 6, 16.5, 2.44),
}


def test_registry_lists_the_documented_aliases():
    assert set(ANCHOR_DIMS) == set(REAL)
    archs = {resolve_model(n).architecture for n in TINY}
    assert archs == set(SUPPORTED_ARCHITECTURES)  # a tiny smoke model of every architecture
    assert known_models()[: len(REAL)] == sorted(REAL)  # real models listed first


@pytest.mark.parametrize("name", REAL)
def test_alias_reproduces_published_total_params(name):
    spec = resolve_model(name)
    assert spec.published_total_params, f"{name} has no published parameter count"
    counts = spec.param_counts()  # transformers' module tree on the meta device
    assert counts["total"] == pytest.approx(spec.published_total_params, rel=0.01), counts
    assert counts["routed"] == spec.routed_params()  # our expert arithmetic matches transformers'
    assert counts["non_expert"] == counts["total"] - counts["routed"]


@pytest.mark.parametrize("name", REAL)
def test_alias_dims_match_anchor_table(name):
    layers, experts, top_k, mib_per_expert, gib_non_expert = ANCHOR_DIMS[name]
    spec = resolve_model(name)
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (layers, experts, top_k)
    assert spec.bytes_per_expert("bfloat16") / 2**20 == pytest.approx(mib_per_expert, rel=0.01)
    assert spec.non_expert_bytes("bfloat16") / 2**30 == pytest.approx(gib_non_expert, rel=0.01)
    assert spec.has_weights is False and spec.checkpoint is None


@pytest.mark.parametrize("name", TINY)
def test_tiny_alias_builds_with_transformers(name):
    spec = resolve_model(name)
    counts = spec.param_counts()
    assert counts["routed"] == spec.routed_params() > 0
    assert counts["non_expert"] > 0
    assert spec.num_moe_layers >= 2 and spec.top_k < spec.num_experts


def test_unknown_name_lists_known_aliases():
    with pytest.raises(ModelError) as info:
        resolve_model("qwen9-moe")
    msg = str(info.value)
    assert "\n" not in msg and "'qwen9-moe'" in msg
    assert info.value.exit_code == EXIT_MODEL
    for alias in known_models():
        assert alias in msg


def test_fingerprint_stable_and_distinct():
    fps = {n: resolve_model(n).fingerprint for n in known_models()}
    assert len(set(fps.values())) == len(fps)  # every alias has its own
    assert all(fp == resolve_model(n).fingerprint for n, fp in fps.items())
    # Pinned: saved configs carry this value; a change here makes every existing config invalid.
    assert fps["qwen2-moe"] == "dims-a3661079ef04e735"


def test_checkpoint_dir_resolves_with_weights(pydocs):
    spec = resolve_model(pydocs)
    assert spec.has_weights and spec.checkpoint == str(pydocs)
    assert spec.architecture == "qwen2_moe"
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (8, 32, 4)
    # The parameter count agrees with the checkpoint's own index.
    index = json.loads((pydocs / "model.safetensors.index.json").read_text())
    assert spec.param_counts()["total"] == index["metadata"]["total_parameters"]
    assert resolve_model(str(pydocs)).fingerprint == spec.fingerprint


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_dir_written_by_transformers_matches_alias(tmp_path, name):
    """A local directory works wherever an alias does: same dims, same fingerprint.

    (transformers 5.24 writes qwen3_moe's expert count as `num_local_experts`.)
    """
    alias = resolve_model(name)
    alias.hf_config().save_pretrained(tmp_path)
    spec = resolve_model(tmp_path)
    assert spec.has_weights is False
    assert spec.fingerprint == alias.fingerprint
    assert spec.dims() == alias.dims()
    assert spec.param_counts() == alias.param_counts()


def test_dir_without_config_json(tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(tmp_path)


def test_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelError, match=r"is a file"):
        resolve_model(f)


def test_non_moe_checkpoint_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 256}))
    with pytest.raises(ModelError) as info:
        resolve_model(tmp_path)
    msg = str(info.value)
    assert "'llama'" in msg and "qwen2_moe" in msg and info.value.exit_code == EXIT_MODEL


def test_moe_type_without_experts_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 0}))
    with pytest.raises(ModelError, match=r"num_experts=0"):
        resolve_model(tmp_path)


def test_corrupt_config_json_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"cannot read"):
        resolve_model(tmp_path)
