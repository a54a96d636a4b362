"""The engine on a tiny model with the Triton kernel (TRITON_INTERPRET=1, CPU tensors): exact."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from expertflow.registry import resolve_model  # noqa: E402
from tests.engine._exact import configs, max_logit_diff, reference, run_engine  # noqa: E402

spec = resolve_model("tiny-qwen2-moe")
model, ids, ref = reference(spec, "cpu", "float32", batch=1, prompt=6, new=5)
L, E = spec.num_moe_layers, spec.num_experts
for key, cfg in configs(spec, "cpu", "float32", policies=("lru",), capacities=(L, L * E // 2)):
    outs, stats, invariant = run_engine(model, cfg, ids, 5, "cpu", kernel="triton")
    assert all(torch.equal(o.sequences, ref.sequences) for o in outs), key
    assert max_logit_diff(outs, ref) < 1e-4, key
    assert invariant, key
    if key[0] > L:
        assert stats["demand_loads"] > 0, stats  # the kernel's read-through wrote what was admitted
print("OK")
