"""Predicted vs measured decode throughput on the graph engine, >= 12 configs, one GPU, one run.

    . bench/gpu_env.sh && python3 bench/validate_gpu.py --json $OUT/validate.json \
        [--hardware-dir DIR] [--extra 12GB:tuned=path/config.yaml ...]

1. the profile: the calibrated synthetic routing trace and the bundled timing of this GPU
   (`--hardware h200`, measured by bench/bundle_hardware.py, the graph engine's included; point
   EXPERTFLOW_HARDWARE_DIR / --hardware-dir at a bundle measured in the same call);
2. the prediction: each config on the simulator's engine timeline (tuner.engine_sim), over the
   exact schedule measured (prefill of the first --prompt-tokens, then one decode step per
   position, --decode-tokens in all), gate weights rounded to bf16 as the replay hands them;
3. the measurement: each config on the graph engine (tuner.validate.measure_on_engine: a fresh
   engine per config and round, graphs captured before the clock starts, the trace's routing
   replayed inside the captured step), in --rounds interleaved rounds (median, min-max);
4. the table: predicted vs measured tokens/s and error, hits and misses predicted vs measured,
   mean / max |error| and the Spearman rank correlation. Targets (issue 13): mean |error| <= 10 %,
   every config within 20 %, Spearman >= 0.9, counts equal.

`--extra BUDGET:LABEL=CONFIG.yaml` adds configs from files (e.g. what ef-tune chose), measured in
the same rounds; with `--pays`, each extra is also measured beside the untuned default a user gets
at its budget (expertflow.default_config: no priors, a cold cache) and compared with it.
bench/tuning_pays.sh runs the whole chain (engine timing, ef-tune per budget, this).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# budget, config values: every policy, the three admission modes (0 = bypass, n = read-through
# slots), adaptive-k thresholds, both allocations, 6GB (qwen2-moe's smallest budget at 4096
# tokens of context is ~5.1GB) to 24GB
SPREAD = [
    ("24GB", {}),
    ("24GB", {"cache.policy": "lfu", "cache.read_through_slots": 0}),
    ("24GB", {"cache.policy": "static", "cache.read_through_slots": 0, "adaptive_k.threshold": 0.9}),
    ("16GB", {"cache.policy": "lru", "cache.read_through_slots": 2}),
    ("16GB", {"cache.policy": "expertflow", "cache.read_through_slots": 1}),
    ("12GB", {}),
    ("12GB", {"cache.policy": "lfu", "cache.read_through_slots": 0}),
    ("12GB", {"cache.policy": "static", "cache.read_through_slots": 1, "adaptive_k.threshold": 0.8}),
    ("12GB", {"cache.policy": "lfu", "cache.read_through_slots": 0, "cache.allocation": "demand"}),
    ("8GB", {}),
    ("8GB", {"cache.policy": "lfu", "cache.read_through_slots": 0}),
    ("8GB", {"cache.policy": "lru", "cache.read_through_slots": 1, "adaptive_k.threshold": 0.9}),
    ("6GB", {"cache.policy": "static", "cache.read_through_slots": 0}),
    ("6GB", {"cache.policy": "lru", "cache.read_through_slots": 1}),
]


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def configs_for(spec, priors, extras):
    from expertflow.budget import plan_memory
    from expertflow.config import default_config, load_config

    out = []
    for budget, values in SPREAD:
        cfg = default_config(spec, plan_memory(spec, budget), priors=priors).with_values(values)
        label = f"{budget} " + (" ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()) or "default")
        out.append((label, budget, cfg))
    for extra in extras:
        budget, rest = extra.split(":", 1)
        name, path = rest.split("=", 1)
        out.append((f"{budget} {name}", budget, load_config(path)))
    return out


def untuned(spec, budget, like):
    """What a user gets without ef-tune: expertflow.default_config (no priors: a cold cache),
    at the context length of the tuned config `like` (so both reserve the same KV cache)."""
    from expertflow.budget import plan_memory
    from expertflow.config import default_config

    return default_config(spec, plan_memory(spec, budget, max_context_tokens=like.memory.max_context_tokens))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2-moe")
    ap.add_argument("--hardware", default="h200")
    ap.add_argument("--hardware-dir", default=None, help="bundle root (default: the packaged one)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--pays", action="store_true", help="compare each --extra with the default at its budget")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.hardware_dir:
        os.environ["EXPERTFLOW_HARDWARE_DIR"] = args.hardware_dir
    import torch

    from decode import Experts  # noqa: PLC0415 - bench/decode.py: pinned host experts, kept across attaches
    from expertflow.engine import attach
    from expertflow.registry import resolve_model
    from expertflow.runtime.loading import build_model
    from tuner.numeric import relative_error
    from tuner.profiler import run_profile
    from tuner.simulator import Costs, simulate
    from tuner.validate import _as_replayed, measure_on_engine, replay_schedule

    spec = resolve_model(args.model)
    prof = run_profile(spec, None, device="cpu", hardware=args.hardware, progress=False)
    costs = Costs.from_profile(prof, spec.bytes_per_expert(), spec.num_layers)
    if costs.engine is None:
        print("validate_gpu.py: error: the bundled timing has no graph-engine tables; run "
              "bench/bundle_hardware.py --engine-only first", file=sys.stderr)
        return 4
    trace = prof.trace
    plan = replay_schedule(trace, args.prompt_tokens, args.decode_tokens)
    decode_tokens = sum(len(r) - p for r, p in plan)
    t0 = time.perf_counter()
    model = build_model(spec, device="cuda", dtype="bfloat16", seed=0, experts_on_host=True)
    Experts(model)  # pin the host experts once
    print(f"built {spec.name} in {time.perf_counter() - t0:.1f} s; {len(plan)} sequence(s), {decode_tokens} "
          f"decode tokens; timing {prof.meta.timing.kind}", flush=True)
    configs = configs_for(spec, prof.priors(), args.extra)
    if args.pays:
        configs += [(f"{b} untuned default", b, untuned(spec, b, cfg)) for _, b, cfg in configs[len(SPREAD):]]
    sim_trace = _as_replayed(trace, model)
    preds = [simulate(sim_trace, costs, cfg, prompt_tokens=args.prompt_tokens, max_decode_tokens=decode_tokens).metrics
             for _, _, cfg in configs]
    runs: dict[str, list[dict]] = {}
    dev = torch.device("cuda")
    for rnd in range(args.rounds):
        for label, _, cfg in configs:
            eng = attach(model, cfg, device="cuda")
            m = measure_on_engine(model, eng, spec, trace, device=dev, replay=True,
                                  prompt_tokens=args.prompt_tokens, max_decode_tokens=args.decode_tokens)
            runs.setdefault(label, []).append(m)
            print(f"round {rnd} {label:<44} {m['decode_tokens_per_s']:7.1f} tok/s hit {m['hit_rate']:.3f}", flush=True)
    rows = []
    for (label, budget, cfg), p in zip(configs, preds):
        ms = runs[label]
        tps = [m["decode_tokens_per_s"] for m in ms]
        med = ms[int(np.argsort(tps)[(len(tps) - 1) // 2])]
        rows.append({"label": label, "budget": budget, "predicted": p, "measured": med, "runs": tps,
                     "error": relative_error(p["decode_tokens_per_s"], med["decode_tokens_per_s"]),
                     "counts_equal": all(abs(m["misses_per_token"] - p["misses_per_token"]) < 1e-9 for m in ms)})
    spread = rows[:len(SPREAD)]
    pred = [r["predicted"]["decode_tokens_per_s"] for r in spread]
    meas = [r["measured"]["decode_tokens_per_s"] for r in spread]
    rho = spearman(pred, meas)
    errs = [abs(r["error"]) for r in spread]
    pays = []
    if args.pays:
        for r in rows[len(SPREAD):len(SPREAD) + len(args.extra)]:
            base = next(x for x in rows if x["label"] == f"{r['budget']} untuned default")
            pays.append({"budget": r["budget"], "label": r["label"],
                         "x_default": r["measured"]["decode_tokens_per_s"] / base["measured"]["decode_tokens_per_s"],
                         "predicted_x_default": r["predicted"]["decode_tokens_per_s"]
                         / base["predicted"]["decode_tokens_per_s"]})
    out = {"device": torch.cuda.get_device_name(), "model": spec.name, "rounds": args.rounds,
           "decode_tokens": decode_tokens, "rows": rows, "spearman": rho, "mean_abs_error": float(np.mean(errs)),
           "max_abs_error": float(np.max(errs)), "pays": pays}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    print(f"\n{'config':<44} {'pred':>7} {'meas':>7} {'min-max':>13} {'error':>7} {'hit p/m':>13} "
          f"{'miss/t p/m':>13} {'counts':>6}")
    for r in rows:
        p, m = r["predicted"], r["measured"]
        print(f"{r['label'][:44]:<44} {p['decode_tokens_per_s']:>7.1f} {m['decode_tokens_per_s']:>7.1f} "
              f"{min(r['runs']):>6.1f}-{max(r['runs']):<6.1f} {r['error']:>+7.1%} "
              f"{p['hit_rate']:>6.3f}/{m['hit_rate']:<6.3f} {p['misses_per_token']:>6.2f}/{m['misses_per_token']:<6.2f} "
              f"{str(r['counts_equal']):>6}")
    every = [abs(r["error"]) for r in rows]
    print(f"all {len(rows)} configs: mean |error| {np.mean(every):.1%}, max {np.max(every):.1%}, Spearman "
          f"{spearman([r['predicted']['decode_tokens_per_s'] for r in rows], [r['measured']['decode_tokens_per_s'] for r in rows]):.3f}")
    print(f"{len(spread)} spread configs: mean |error| {np.mean(errs):.1%}, max |error| {np.max(errs):.1%}, "
          f"Spearman {rho:.3f}")
    for x in pays:
        print(f"tuning pays @ {x['budget']}: {x['label']} measured {x['x_default']:.2f}x the default "
              f"(predicted {x['predicted_x_default']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
