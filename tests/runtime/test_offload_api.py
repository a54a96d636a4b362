"""The public runtime API: expertflow.offload / load_model, handle stats, refusals, light imports."""

import json
import subprocess
import sys

import pytest
import torch

import expertflow
from expertflow.budget import plan_memory
from expertflow.config import default_config, save_config
from expertflow.errors import ModelError
from expertflow.runtime.generate import greedy_generate


def _cfg(name, **values):
    spec = expertflow.resolve_model(name)
    cfg = default_config(spec, plan_memory(spec, "1GB", dtype="float32", max_context_tokens=64),
                         device="cpu", dtype="float32")
    return cfg.with_values(values)


def test_runtime_imports_neither_optuna_nor_plotly():
    code = ("import sys, expertflow, expertflow.runtime.offload, expertflow.runtime.loading, "
            "expertflow.runner; print(sorted(m for m in ('optuna', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_offload_from_a_config_path_as_a_context_manager(tmp_path):
    cfg = _cfg("tiny-qwen2-moe", **{"cache.capacity_experts": 8, "prefetch.depth": 1})
    path = save_config(cfg, tmp_path / "config.yaml")
    model, _ = expertflow.load_model("tiny-qwen2-moe", None, device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with expertflow.offload(model, path) as handle:
        greedy_generate(model, ids, 4)
        stats = handle.stats
        assert json.loads(handle.stats_json())["total"]["hits"] == stats["total"]["hits"]
    t = stats["total"]
    assert t["hits"] + t["misses"] == t["unique_needed"] > 0
    assert t["forward_steps"] == 4 and t["tokens_generated"] == 3
    assert t["bytes_moved"] == (t["demand_loads"] + t["prefetch_issued"]) * handle.expert_bytes
    assert len(stats["per_layer"]["hits"]) == 4
    assert "gate_up_proj" in dict(model.named_parameters(recurse=True)).__repr__() or any(
        n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters())


def test_load_model_builds_straight_into_offloaded_form():
    cfg = _cfg("tiny-olmoe", **{"cache.capacity_experts": 8})
    model, handle = expertflow.load_model("tiny-olmoe", cfg)
    try:
        assert not any(n.endswith("gate_up_proj") for n, _ in model.named_parameters())
        assert handle.pool_gate_up.shape[0] == 8
        greedy_generate(model, torch.zeros((1, 3), dtype=torch.long), 2)
        assert handle.stats["total"]["misses"] > 0
    finally:
        handle.detach()
    assert any(n.endswith("gate_up_proj") for n, _ in model.named_parameters())


def test_a_config_for_another_model_is_refused():
    cfg = _cfg("tiny-qwen2-moe")
    model, _ = expertflow.load_model("tiny-mixtral", None, device="cpu", dtype="float32")
    with pytest.raises(ModelError, match="config was made for 'tiny-qwen2-moe'"):
        expertflow.offload(model, cfg)


def test_trace_recording_matches_the_router():
    cfg = _cfg("tiny-qwen3-moe")
    model, _ = expertflow.load_model("tiny-qwen3-moe", None, device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    routed = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: routed.append(out[2].clone()))
             for layer in model.model.layers]
    with expertflow.offload(model, cfg, record_trace=True) as handle:
        greedy_generate(model, ids, 3)
        trace = handle.trace()
    for h in hooks:
        h.remove()
    assert trace.num_tokens == 2 * 5 + 2 * 2  # prefill + two decode steps of two sequences
    assert trace.steps[:, 1].tolist() == [10, 2, 2]
    assert torch.equal(torch.from_numpy(trace.ids[:10, 0]), routed[0].cpu())  # layer 0, prefill
    assert trace.pred.shape[2] == 4 and (trace.pred[:, -1] == -1).all()  # no layer after the last
