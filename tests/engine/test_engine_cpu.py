"""The graph engine's bookkeeping on CPU, eagerly (the decode step is not captured here, but the
same code runs: tables, ring buffer, one-step-behind decisions, read-through admission).

Exactness against the un-offloaded model on every tiny architecture, the tables' invariant
(every expert the host calls resident sits byte for byte in its slot, and the device table says
the same), adaptive-k on the device equal to the core's rule, the engine driven by the Triton
kernel under TRITON_INTERPRET=1, and the model restored by detach.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from expertflow.core import adaptive_k
from expertflow.engine import attach, device_adaptive_k
from expertflow.registry import resolve_model

from ._exact import ARCHS, configs, max_logit_diff, reference, run_engine


@pytest.mark.parametrize("name", ARCHS)
def test_exact_against_unoffloaded(name):
    spec = resolve_model(name)
    model, ids, ref = reference(spec, "cpu", "float32")
    admitted = 0
    # CI keeps it lean: two policies here; the GPU test runs every policy
    for key, cfg in configs(spec, "cpu", "float32", policies=("lru", "static")):
        outs, stats, invariant = run_engine(model, cfg, ids, 8, "cpu")
        assert all(torch.equal(o.sequences, ref.sequences) for o in outs), (name, key)
        assert max_logit_diff(outs, ref) < 1e-4, (name, key)
        assert invariant, (name, key)
        admitted += stats["demand_loads"]
        if key[0] == spec.num_moe_layers:
            assert stats["misses"] > 0 and stats["demand_loads"] == 0  # 1 slot/layer: nothing staged
    assert admitted > 0  # half and all capacities admit through the staging slots


def test_detach_restores_the_model():
    spec = resolve_model("tiny-qwen2-moe")
    model, ids, ref = reference(spec, "cpu", "float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, cfg = next(iter(configs(spec, "cpu", "float32", policies=("lru",), capacities=(8,))))
    with attach(model, cfg, device="cpu") as eng:
        eng.generate(ids, 4)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adaptive_k_on_device_equals_core_rule():
    g = torch.Generator().manual_seed(0)
    for threshold, min_k, renorm in [(0.5, 1, False), (0.8, 2, True), (0.95, 1, True), (0.3, 1, False)]:
        w = torch.rand(64, 4, generator=g)
        w[::7, 1] = w[::7, 0]  # ties
        ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(64)])
        kept_ids, new_w = device_adaptive_k(ids, w, threshold, min_k, renorm)
        mask, ref_w = adaptive_k.apply(w.numpy(), threshold, min_k, renorm)
        assert np.array_equal(kept_ids.numpy() >= 0, mask)
        assert np.array_equal(kept_ids.numpy()[mask], ids.numpy()[mask])
        assert np.allclose(new_w.numpy(), ref_w, rtol=1e-6, atol=0)


def test_adaptive_k_dropped_experts_are_neither_read_nor_missed():
    spec = resolve_model("tiny-qwen2-moe")
    model, ids, _ = reference(spec, "cpu", "float32")
    L = spec.num_moe_layers
    (_, full), = configs(spec, "cpu", "float32", policies=("lru",), capacities=(L,))
    (_, ak), = configs(spec, "cpu", "float32", policies=("lru",), capacities=(L,), threshold=0.5)
    res = {}
    for label, cfg in (("full", full), ("ak", ak)):
        with attach(model, cfg, device="cpu") as eng:
            eng.generate(ids, 6)
            res[label] = eng.stats["total"]
    assert res["ak"]["activated"] < res["full"]["activated"]
    assert res["ak"]["misses"] < res["full"]["misses"]
    assert res["ak"]["dropped_mass"] > 0


@pytest.mark.slow
def test_engine_with_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("_engine_triton_check.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout, proc.stdout


def test_ef_run_uses_the_engine_the_config_names(tmp_path, capsys):
    """ef-run follows runtime.engine: the graph engine (its step run eagerly on CPU) and the eager
    runtime generate the same tokens, and ef-run reports the engine, hit rate and misses."""
    import json

    from efcli.run import main as run_main
    from expertflow.config import save_config

    from ._exact import configs

    spec = resolve_model("tiny-qwen2-moe")
    L = spec.num_moe_layers
    (_, cfg), = configs(spec, "cpu", "float32", policies=("lru",), capacities=(L,))
    outs = {}
    for engine in ("graph", "eager"):
        path = save_config(cfg.with_values({"runtime.engine": engine}), tmp_path / f"{engine}.yaml")
        assert run_main(["--config", str(path), "--device", "cpu", "--json", "--max-new-tokens", "6",
                         "--prompt-ids", "1,2,3,4,5,6,7,8"]) == 0
        outs[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert outs["graph"]["engine"] == "graph" and outs["eager"]["engine"] == "eager"
    assert outs["graph"]["token_ids"] == outs["eager"]["token_ids"]
    assert outs["graph"]["misses"] > 0 and 0 <= outs["graph"]["hit_rate"] < 1  # 1 slot per layer
    path = save_config(cfg.with_values({"runtime.engine": "graph"}), tmp_path / "short.yaml")
    assert run_main(["--config", str(path), "--device", "cpu", "--max-new-tokens", "100",
                     "--prompt-ids", "1,2,3"]) == 3  # past max_context_tokens (64): a config error
    assert "max_context_tokens 64" in capsys.readouterr().err


def test_model_calls_outside_the_engine_loop_are_refused():
    spec = resolve_model("tiny-qwen2-moe")
    model, ids, _ = reference(spec, "cpu", "float32")
    _, cfg = next(iter(configs(spec, "cpu", "float32", policies=("lru",), capacities=(8,))))
    with attach(model, cfg, device="cpu") as eng:
        with pytest.raises(RuntimeError, match="engine.generate"):
            model(ids)
        eng.generate(ids, 2)  # and the engine itself still runs
