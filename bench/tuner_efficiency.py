"""Tuner efficiency: how close <= 100 TPE trials get to an exhaustive grid, and simulator speed.

On the default qwen2-moe trace (synthetic routing, the qwen2_moe preset, the embedded prompt
set's sequence lengths) and the bundled h200 costs when they exist (else built-in H200 costs
from ../shared/anchors.md, said in the output), for each budget:

* the search space is default.yaml COARSENED to a grid, the same for TPE and the grid:
    adaptive_k.threshold 0.80..1.00 step 0.05 (below 0.8 the dropped-mass cap rules it out)
    adaptive_k.min_k     fixed at 1
    cache.capacity_experts {budget/2, budget} (more slots never hurt; two sizes show it)
    cache.scope x cache.allocation: per_layer/uniform, per_layer/demand, pooled
    cache.policy         lru, lfu, static, expertflow (expertflow's weights at their defaults)
  and, for the executor the costs describe (ef-tune's engine_space):
    graph engine (the bundled h200 tables with engine timing, the default):
    cache.read_through_slots 0..2 (no prefetch: misses are read zero-copy in the step)
    eager runtime (--eager, or costs without engine timing):
    prefetch.depth       0..4          prefetch.width  {top_k/2, top_k}
    prefetch.adaptive    false/true    (min_precision at its default)
* the exhaustive grid is simulated in --jobs processes; the TPE study (ef-tune's own sampler,
  with its two enqueued baselines) runs --trials trials for each of --seeds seeds;
* both keep the same rule as ef-tune: fastest feasible config within the quality cap
  (dropped gate mass <= --cap), on the same trace slice (--decode-tokens).

Prints: simulator trials/s (per process, and for the grid in wall time), and per budget the
grid's best, TPE's best per seed, their ratio (target >= 0.98) and the trial at which TPE first
reached 98%.

    python bench/tuner_efficiency.py [--budgets 24GB 12GB] [--trials 100] [--seeds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_CTX = None  # the StudyContext in grid worker processes


def _eval(values):
    from tuner.objective import evaluate

    t0 = time.process_time()
    try:
        m, cons = evaluate(_CTX, values)
    except Exception as exc:  # noqa: BLE001 - a failed point is reported, not fatal
        return values, None, None, time.process_time() - t0, repr(exc)
    return values, m, cons, time.process_time() - t0, None


def _init(ctx):
    global _CTX
    _CTX = ctx


def coarse_space(symbols: dict, cap_thresholds=(0.8, 1.0), engine: bool = True):
    from tuner.search_space import parse_space

    budget, k = symbols["budget"], symbols["top_k"]
    half = max(symbols["layers"], budget // 2)
    params = {
        "adaptive_k.threshold": {"type": "float", "low": cap_thresholds[0], "high": cap_thresholds[1], "step": 0.05},
        "cache.capacity_experts": {"type": "int", "low": half, "high": budget, "step": max(1, budget - half)},
        "cache.scope": {"type": "categorical", "choices": ["per_layer", "pooled"]},
        "cache.allocation": {"type": "categorical", "choices": ["uniform", "demand"],
                             "when": {"cache.scope": "per_layer"}},
        "cache.policy": {"type": "categorical", "choices": ["lru", "lfu", "static", "expertflow"]},
    }
    if engine:
        params["cache.read_through_slots"] = {"type": "int", "low": 0, "high": 2}
    else:
        params.update({
            "prefetch.depth": {"type": "int", "low": 0, "high": min(4, symbols["lookahead"])},
            "prefetch.width": {"type": "int", "low": max(1, k // 2), "high": k, "step": max(1, k - k // 2)},
            "prefetch.adaptive": {"type": "bool"}})
    return parse_space({"version": 1, "params": params}, "bench coarse space").resolve(symbols)


def grid_points(space) -> list[dict]:
    """Every point of the coarse space (conditional parameters only where active)."""
    uncond = [p for p in space if not p.when]
    cond = [p for p in space if p.when]
    out = []
    for combo in itertools.product(*[p.grid(64) for p in uncond]):
        base = dict(zip([p.key for p in uncond], combo))
        active = [p for p in cond if p.active(base)]
        for extra in itertools.product(*[p.grid(64) for p in active]):
            out.append({**base, **dict(zip([p.key for p in active], extra))})
    return out


def build_context(budget: str, decode_tokens: int, cap: float, seed: int = 0, eager: bool = False):
    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.registry import resolve_model
    from tuner import stats, synthetic
    from tuner.profiler.activation import load_prompts, token_counts, tokenize_prompts
    from tuner.objective import StudyContext

    spec = resolve_model("qwen2-moe")
    plan = plan_memory(spec, budget)
    params = synthetic.preset_params("qwen2_moe", num_layers=spec.num_moe_layers,
                                     num_experts=spec.num_experts, top_k=spec.top_k)
    lens = token_counts(tokenize_prompts(spec, load_prompts(None)))
    trace = synthetic.generate(params, lens, seed=seed, meta={"fingerprint": spec.fingerprint})
    costs, source = _costs(spec, plan)
    acts = stats.activation_table(trace)
    import numpy as np

    priors = np.zeros((trace.num_layers, trace.num_experts))
    priors[acts["layer"].to_numpy(int), acts["expert"].to_numpy(int)] = acts["frequency"].to_numpy(float)
    base = default_config(spec, plan, priors=priors, routing="synthetic",
                          **({"device": "cpu"} if eager or costs.engine is None else {}))
    base = base.with_values({"prefetch.bandwidth_gbps": plan.bytes_per_expert / (costs.copy_ms * 1e6),
                             "prefetch.layer_time_ms": costs.host_layer_ms})
    symbols = {"budget": min(plan.capacity_experts, plan.total_experts), "layers": spec.num_moe_layers,
               "experts": spec.num_experts, "total": plan.total_experts, "top_k": spec.top_k,
               "lookahead": trace.lookahead}
    space = coarse_space(symbols, engine=not eager and costs.engine is not None)
    ctx = StudyContext(trace, costs, base, space, quality_cap=cap, max_decode_tokens=decode_tokens)
    return ctx, plan, symbols, source, trace


def _costs(spec, plan):
    from tuner.simulator import Costs

    try:
        from tuner.profile import TimingTables
        from tuner.profiler.bundled import load_bundled

        _, tables = load_bundled("h200", spec)
        prof = TimingTables(tables, name="the bundled h200 tables")
        return Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers), "bundled:h200"
    except Exception as exc:  # noqa: BLE001 - no bundle here: built-in numbers, said so
        # anchors.md: one 17.3 MB expert over PCIe 0.33 ms; SwiGLU expert 0.10-0.16 ms (1-256
        # tokens). Non-expert layer GPU time and the host's per-layer time are ASSUMED.
        return (Costs(copy_ms=0.33, layer_ms=((1, 0.10), (256, 0.40)), kernel_ms=((1, 0.10), (256, 0.16)),
                      host_layer_ms=1.2, num_decoder_layers=spec.num_layers),
                f"built-in H200 numbers from anchors.md (no bundle: {str(exc)[:80]})")


def best_within(results, cap):
    ok = [(m["decode_tokens_per_s"], v) for v, m, c, _, _ in results
          if m is not None and all(x <= 0 for x in c.values()) and m["quality_loss"] <= cap + 1e-12]
    return max(ok, key=lambda x: x[0]) if ok else (None, None)


def run_budget(budget: str, args) -> dict:
    from tuner.study import baseline_values, run_study
    from tuner.trials import completed_trials

    ctx, plan, symbols, source, trace = build_context(budget, args.decode_tokens, args.cap, eager=args.eager)
    points = grid_points(ctx.space)
    print(f"\n== qwen2-moe, budget {budget}: {plan.capacity_experts} of {plan.total_experts} expert slots; "
          f"trace {trace.num_tokens} tokens ({len(set(trace.seq.tolist()))} sequences), slice "
          f"{args.decode_tokens} decode tokens; costs: {source}", flush=True)
    executor = "eager runtime" if ctx.base_config.runtime.device == "cpu" else "graph engine"
    print(f"coarse grid on the {executor}'s timeline: {len(points)} configs (space: "
          f"{json.dumps(ctx.space.as_dict())})", flush=True)
    t0 = time.perf_counter()
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(args.jobs, initializer=_init, initargs=(ctx,)) as pool:
        results = pool.map(_eval, points, chunksize=8)
    grid_wall = time.perf_counter() - t0
    cpu = sum(r[3] for r in results)
    failed = [r for r in results if r[4]]
    g_best, g_vals = best_within(results, args.cap)
    print(f"grid: {len(points)} simulations in {grid_wall:.1f} s wall on {args.jobs} processes = "
          f"{len(points) / grid_wall:.2f} trials/s; {len(points) / cpu:.2f} trials/s per process "
          f"({1000 * cpu / len(points):.0f} ms each); {len(failed)} failed", flush=True)
    import numpy as np

    speeds = np.array([m["decode_tokens_per_s"] for v, m, c, _, _ in results
                       if m is not None and all(x <= 0 for x in c.values()) and m["quality_loss"] <= args.cap + 1e-12])
    spread = {"worst": float(speeds.min()), "median": float(np.median(speeds)),
              "share_within_98pct": float((speeds >= 0.98 * g_best).mean()), "feasible": int(len(speeds))}
    print(f"grid best within cap: {g_best:.3f} tokens/s at {g_vals}", flush=True)
    print(f"grid spread ({spread['feasible']} feasible within cap): worst {spread['worst']:.3f}, median "
          f"{spread['median']:.3f}; {spread['share_within_98pct']:.1%} of them reach 98% of the best", flush=True)
    base = ctx.base_config
    rows = []
    for seed in range(args.seeds):
        t1 = time.perf_counter()
        run = run_study(ctx, storage_url="memory", name=f"bench-{seed}", n_trials=args.trials, seed=seed,
                        progress=False, baselines=baseline_values(ctx.space, base, symbols["budget"]))
        trials = sorted(completed_trials(run.study), key=lambda t: t.number)
        best, reached, exact = None, None, None
        for t in trials:
            if t.feasible and t.metrics["quality_loss"] <= args.cap + 1e-12:
                best = t.values[0] if best is None else max(best, t.values[0])
            if reached is None and best is not None and best >= 0.98 * g_best:
                reached = t.number + 1
            if exact is None and best is not None and best >= g_best * (1 - 1e-9):
                exact = t.number + 1
        rows.append({"seed": seed, "best": best, "ratio": best / g_best, "reached_98_at": reached,
                     "reached_best_at": exact, "wall_s": time.perf_counter() - t1})
        print(f"TPE seed {seed}: best {best:.3f} tokens/s = {best / g_best:.4f} of the grid's best "
              f"(>= 98% from trial {reached}, the grid's best itself from trial {exact}); "
              f"{args.trials} trials in {rows[-1]['wall_s']:.1f} s", flush=True)
    return {"budget": budget, "grid_configs": len(points), "grid_best": g_best, "grid_best_params": g_vals,
            "grid_trials_per_s_wall": len(points) / grid_wall, "sim_trials_per_s_per_process": len(points) / cpu,
            "grid_spread": spread, "tpe": rows, "costs": source}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", nargs="+", default=["24GB", "12GB"])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--decode-tokens", type=int, default=128, help="trace slice (ef-tune's study slice)")
    ap.add_argument("--cap", type=float, default=0.02, help="quality cap (dropped gate mass)")
    ap.add_argument("--eager", action="store_true",
                    help="the eager runtime's space and timeline (prefetch) instead of the graph engine's")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("optuna").setLevel(logging.ERROR)
    out = [run_budget(b, args) for b in args.budgets]
    print("\nsummary:")
    for r in out:
        ratios = [x["ratio"] for x in r["tpe"]]
        print(f"  {r['budget']}: TPE/grid best ratio min {min(ratios):.4f}, mean {sum(ratios) / len(ratios):.4f} "
              f"over {len(ratios)} seeds ({r['grid_configs']}-config grid); simulator "
              f"{r['sim_trials_per_s_per_process']:.2f} trials/s per process")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
