"""Predicted vs measured decode throughput for 8 configs spread over the search space, on one GPU.

    . bench/gpu_env.sh && python3 bench/validate_gpu.py --json $OUT/validate.json

1. profiles the model on this GPU now (timing of the current runtime; synthetic routing for a
   random-weights alias, real routing for a checkpoint);
2. simulates each config on the profile's trace (the simulator's prediction);
3. runs each config on the real runtime over the same schedule, the trace's routing replayed
   (tuner.validate), and prints predicted vs measured with the relative error and the Spearman
   rank correlation over the 8 configs. Target: |error| <= 15 %, Spearman >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def spread_configs(spec, priors):
    """8 configs over budget (cache size), policy, scope, prefetch depth and adaptive-k."""
    from expertflow.budget import plan_memory
    from expertflow.config import default_config

    rows = [
        ("24GB", {"cache.policy": "lru", "prefetch.depth": 0}),
        ("24GB", {"cache.policy": "lru", "prefetch.depth": 1}),
        ("24GB", {"cache.policy": "expertflow", "prefetch.depth": 2, "adaptive_k.threshold": 0.9}),
        ("16GB", {"cache.policy": "lfu", "prefetch.depth": 1, "cache.scope": "pooled"}),
        ("16GB", {"cache.policy": "static", "prefetch.depth": 0}),
        ("12GB", {"cache.policy": "lru", "prefetch.depth": 0}),
        ("12GB", {"cache.policy": "expertflow", "prefetch.depth": 1, "adaptive_k.threshold": 0.8,
                  "cache.allocation": "demand"}),
        ("8GB", {"cache.policy": "lru", "prefetch.depth": 2, "cache.warm_start": False}),
    ]
    out = []
    for budget, values in rows:
        cfg = default_config(spec, plan_memory(spec, budget), priors=priors).with_values(values)
        label = f"{budget} " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
        out.append((label, cfg))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2-moe")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--profile-out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu runs a smoke test")
    args = ap.parse_args(argv)
    from expertflow.registry import resolve_model
    from tuner.profiler import run_profile
    from tuner.simulator import Costs
    from tuner.validate import validate_configs

    spec = resolve_model(args.model)
    t0 = time.perf_counter()
    prof = run_profile(spec, args.profile_out, device=args.device, progress=False,
                       quick=args.device == "cpu")
    print(f"profiled {spec.name} in {time.perf_counter() - t0:.1f} s "
          f"(routing {prof.routing_kind}, decode_layer_ms {prof.runtime_value('decode_layer_ms'):.3f})", flush=True)
    costs = Costs.from_profile(prof, spec.bytes_per_expert(), num_decoder_layers=spec.num_layers)
    configs = spread_configs(spec, prof.priors())
    t0 = time.perf_counter()
    if args.device == "cpu":
        configs = [(label, c.with_values({"runtime.device": "cpu", "runtime.dtype": "float32"}))
                   for label, c in configs]
    res = validate_configs(spec, [c for _, c in configs], prof.trace, device=args.device,
                           max_new_tokens=args.decode_tokens, costs=costs, labels=[lb for lb, _ in configs],
                           force=args.device == "cpu")
    print(f"validated {len(res)} configs in {time.perf_counter() - t0:.1f} s", flush=True)
    pred = [r["predicted"]["decode_tokens_per_s"] for r in res]
    meas = [r["measured"]["decode_tokens_per_s"] for r in res]
    rho = spearman(pred, meas)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": res, "spearman": rho}, indent=2, default=float))
    print(f"\n{'config':<64} {'pred tok/s':>10} {'meas tok/s':>10} {'error':>7} {'hit p/m':>11}")
    for r in res:
        p, m = r["predicted"], r["measured"]
        err = (m["decode_tokens_per_s"] - p["decode_tokens_per_s"]) / p["decode_tokens_per_s"]
        print(f"{r['label'][:64]:<64} {p['decode_tokens_per_s']:>10.2f} {m['decode_tokens_per_s']:>10.2f} "
              f"{err:>+7.1%} {p['hit_rate']:>5.3f}/{m['hit_rate']:.3f}")
    errs = [abs(m - p) / p for p, m in zip(pred, meas)]
    print(f"max |error| {max(errs):.1%}, mean |error| {np.mean(errs):.1%}, Spearman {rho:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
