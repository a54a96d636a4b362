"""Memory budget: size parsing (decimal vs binary units) and the capacity accounting."""

from __future__ import annotations

import pytest

from expertflow.budget import MemoryPlan, format_bytes, parse_size, plan_memory
from expertflow.errors import EXIT_BUDGET, BudgetError
from expertflow.registry import resolve_model

# ---- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected_bytes,unit", [
    ("24GB", 24 * 10**9, "10^9"),
    ("24GiB", 24 * 2**30, "2^30"),
    ("24000MB", 24 * 10**9, "10^6"),
    ("0.5TB", 5 * 10**11, "10^12"),
    ("24 gb", 24 * 10**9, "10^9"),
    (" 22.5GiB ", int(22.5 * 2**30), "2^30"),
    ("512MiB", 512 * 2**20, "2^20"),
    ("1048576", 2**20, "bytes"),
    (".5GB", 5 * 10**8, "10^9"),
])
def test_parse_size(text, expected_bytes, unit):
    parsed = parse_size(text)
    assert parsed.bytes == expected_bytes
    assert unit in parsed.unit_meaning
    assert f"{expected_bytes:,} bytes" in parsed.describe()


def test_gb_and_gib_differ():
    gb, gib = parse_size("24GB"), parse_size("24GiB")
    assert gib.bytes - gb.bytes == 24 * (2**30 - 10**9)
    assert "decimal" in gb.describe() and "binary" in gib.describe()


def test_parse_size_accepts_positive_int_bytes():
    assert parse_size(4096).bytes == 4096


@pytest.mark.parametrize("text", ["24XB", "", "-1GB", "GB", "24 G B", "1e3GB", "24GB!", "0GB",
                                  "0.0000000001B", 0, -5, True])
def test_parse_size_rejects(text):
    with pytest.raises(BudgetError) as info:
        parse_size(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(text) in msg or str(text) in msg  # the value seen is named
    assert "24GB" in msg  # and an example of what to write
    assert info.value.exit_code == EXIT_BUDGET


# ---- accounting --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    return resolve_model("qwen2-moe")


@pytest.fixture(scope="module")
def qwen_plan(qwen) -> MemoryPlan:
    return plan_memory(qwen, "24GB")


def test_qwen2_moe_24gb_terms_computed_from_dims(qwen, qwen_plan):
    p = qwen_plan
    assert p.budget_bytes == 24 * 10**9
    # Non-expert weights: the parameters that are not routed experts, in bf16.
    counts = qwen.param_counts()
    assert p.non_expert_bytes == counts["non_expert"] * 2
    assert counts["routed"] == 24 * 60 * 3 * 2048 * 1408
    # ~3.46 GiB of non-expert weights for Qwen1.5-MoE (anchors.md).
    assert p.non_expert_bytes / 2**30 == pytest.approx(3.46, abs=0.01)
    # KV cache: 24 layers x K and V x 16 heads x 128 dims x bf16, per token, 4096 tokens, batch 1.
    assert p.kv_cache_bytes == 24 * 2 * 16 * 128 * 2 * 4096 * 1
    assert p.margin_bytes == int(24 * 10**9 * 0.05)
    assert p.bytes_per_expert == 3 * 2048 * 1408 * 2  # gate, up, down in bf16 = 16.5 MiB
    assert p.workspace_bytes > 256 * 2**20  # the allocator reserve plus live activations
    # The cache gets what is left, in whole experts.
    left = p.budget_bytes - p.non_expert_bytes - p.kv_cache_bytes - p.workspace_bytes - p.margin_bytes
    assert p.expert_cache_bytes == left
    assert p.capacity_experts == left // p.bytes_per_expert
    assert p.total_experts == 24 * 60
    assert 0 < p.capacity_experts < p.total_experts  # 24GB cannot hold all 23.2 GiB of experts
    assert sum(value for _, value in p.terms()) == p.budget_bytes
    assert dict(p.terms())["expert cache"] == p.capacity_experts * p.bytes_per_expert
    assert 0 <= dict(p.terms())["unused"] < p.bytes_per_expert


def test_qwen2_moe_24gb_describe_lists_every_term(qwen_plan):
    text = qwen_plan.describe()
    p = qwen_plan
    assert "24GB" in text and "decimal GB = 10^9 bytes" in text and "24,000,000,000 bytes" in text
    for label, value in p.terms():
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(label)), None)
        assert line is not None, f"{label!r} missing from:\n{text}"
        assert f"{value:,} bytes" in line and format_bytes(value) in line, line
    assert f"{p.capacity_experts} of {p.total_experts} experts" in text


def test_describe_says_binary_unit(qwen):
    text = plan_memory(qwen, "24GiB").describe()
    assert "24GiB" in text and "binary GiB = 2^30 bytes" in text
    assert f"{24 * 2**30:,} bytes" in text


def test_capacity_grows_with_budget_and_shrinks_with_context(qwen, qwen_plan):
    bigger = plan_memory(qwen, "24GiB")
    assert bigger.capacity_experts > qwen_plan.capacity_experts
    long_ctx = plan_memory(qwen, "24GB", max_context_tokens=32768, max_batch=2)
    assert long_ctx.kv_cache_bytes == qwen_plan.kv_cache_bytes * 16
    assert long_ctx.capacity_experts < qwen_plan.capacity_experts


def test_capacity_capped_at_all_experts(qwen):
    p = plan_memory(qwen, "0.5TB")
    assert p.capacity_experts == p.total_experts and p.fits_all_experts


def test_plan_records_the_unit(qwen_plan):
    assert qwen_plan.budget_text == "24GB"
    assert qwen_plan.budget_unit == "decimal GB = 10^9 bytes"
    assert qwen_plan.as_dict()["budget_unit"] == qwen_plan.budget_unit


def test_too_small_budget_names_needed_and_given(qwen):
    with pytest.raises(BudgetError) as info:
        plan_memory(qwen, "3GB")
    msg = str(info.value)
    assert "\n" not in msg and info.value.exit_code == EXIT_BUDGET
    assert "needed" in msg and "given 3GB = 3,000,000,000 bytes" in msg
    # The needed figure is the fixed part plus one expert slot.
    needed = int(msg.split("needed at least ")[1].split("(")[1].split(" bytes")[0].replace(",", ""))
    probe = plan_memory(qwen, "0.5TB")
    margin_at_3gb = int(3 * 10**9 * 0.05)
    assert needed == (probe.non_expert_bytes + probe.kv_cache_bytes + probe.workspace_bytes
                      + margin_at_3gb + probe.bytes_per_expert)
    # That much (plus what the margin takes of the extra) is enough.
    assert plan_memory(qwen, needed * 2).capacity_experts >= 1


@pytest.mark.parametrize("kwargs", [{"max_context_tokens": 0}, {"max_batch": 0},
                                    {"prefill_chunk_tokens": 0}, {"margin_fraction": 0.5}])
def test_bad_plan_arguments(qwen, kwargs):
    with pytest.raises(BudgetError):
        plan_memory(qwen, "24GB", **kwargs)


# ---- the KV reservation follows the model's max_position_embeddings --------------------------------


def test_default_kv_reservation_is_capped_at_the_models_context(pydocs):
    """pydocs-moe attends 1024 tokens: by default its KV cache is reserved for 1024, not 4096
    (issue 13: 4x too much), and the freed bytes go to the expert cache."""
    from expertflow.budget import default_max_context

    spec = resolve_model(pydocs)
    assert spec.config["max_position_embeddings"] == 1024
    assert default_max_context(spec) == 1024
    plan, long = plan_memory(spec, "1GB"), plan_memory(spec, "1GB", max_context_tokens=4096)
    assert plan.max_context_tokens == 1024
    assert plan.kv_cache_bytes == spec.kv_bytes_per_token("bfloat16") * 1024
    assert long.kv_cache_bytes == 4 * plan.kv_cache_bytes
    assert plan.expert_cache_bytes > long.expert_cache_bytes
    # a model that attends further keeps the 4096-token default
    assert default_max_context(resolve_model("qwen2-moe")) == 4096


def test_max_context_above_the_models_is_a_usage_error(pydocs):
    from expertflow.budget import check_max_context
    from expertflow.errors import EXIT_USAGE, UsageError

    spec = resolve_model(pydocs)
    assert check_max_context(spec, None) == 1024 and check_max_context(spec, 1024) == 1024
    with pytest.raises(UsageError) as info:
        check_max_context(spec, 2048)
    msg = str(info.value)
    assert info.value.exit_code == EXIT_USAGE and "\n" not in msg
    assert "--max-context 2048" in msg and "1024" in msg and "max_position_embeddings" in msg


def test_ef_tune_refuses_a_max_context_above_the_models_before_any_work(pydocs, tmp_path, capsys):
    from expertflow.errors import EXIT_USAGE
    from efcli.tune import main as tune_main

    out = tmp_path / "out"
    rc = tune_main(["--model", str(pydocs), "--budget", "1GB", "--max-context", "4096", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USAGE and len(err.splitlines()) == 1
    assert "--max-context 4096" in err and "1024" in err
    assert not out.exists()  # checked before profiling: nothing written
