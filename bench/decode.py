"""Decode benchmark on one GPU: every row in ONE run, interleaved rounds, replayed routing.

Qwen1.5-MoE-A2.7B dims (`qwen2-moe`), random bf16 weights, batch 1, greedy. Rows:
  transformers all-on-GPU, generate(), its fastest experts backend     -> the baseline to beat
  eager runtime (transformers modules per step) at the first budget      -> what the graph replaces
  graph engine, every expert resident (and with --no-fuse the same with the engine's fusions off)
  graph engine at each --budgets value
Routing in every offloaded row is REPLAYED from the calibrated synthetic trace (the profile's, as
tuner.validate replays it): a random-weight router picks nearly the same experts every step and
exercises no offloading. Each round measures every row once, in the same order; the table shows
each row's median round and the min-max.

Columns: decode tokens/s (median, min-max), x the fastest transformers row, hit rate,
misses/token, MB read over PCIe per token, prefill tokens/s (32-token prompt), peak GPU memory (allocated, reserved: from attach to the end of decode), and the row's floor:
all-resident step time + miss bytes / the pinned host->device bandwidth measured in this run
("x floor" = measured time per token / floor).

    . bench/gpu_env.sh && python3 bench/decode.py --json $OUT/decode.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# Reserved memory stays close to allocated memory (the budget is checked against reserved):
# the caching allocator grows segments in place instead of keeping many fixed-size ones.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertflow.budget import format_bytes, plan_memory  # noqa: E402
from expertflow.config import default_config  # noqa: E402
from expertflow.engine import attach, replay_generate  # noqa: E402
from expertflow.errors import BudgetError  # noqa: E402
from expertflow.registry import resolve_model  # noqa: E402
from expertflow.runtime.adapters import find_moe_blocks  # noqa: E402
from expertflow.runtime.loading import build_model  # noqa: E402
from expertflow.runtime.offload import offload  # noqa: E402


NO_FUSE = "graph engine, every expert resident, no fusions"


def sync():
    torch.cuda.synchronize()


def memory_window():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peaks():
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def pcie_gbps(size=1 << 30, reps=5) -> float:
    """Pinned host->device copy bandwidth (GB/s), median of `reps`."""
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps + 1):
        sync()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        times.append(time.perf_counter() - t)
    del src, dst
    return size / float(np.median(times[1:])) / 1e9


class Experts:
    """Move the routed experts between the GPU (all-on-GPU rows) and their pinned host copies
    (offloaded rows) without re-allocating 23 GiB of pinned memory each round."""

    def __init__(self, model):
        self.blocks = find_moe_blocks(model)
        self.host = []
        for b in self.blocks:
            ex = b.experts
            pair = []
            for name in ("gate_up_proj", "down_proj"):
                p = ex._parameters[name]
                if not p.is_pinned():
                    h = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
                    h.copy_(p.data)
                    p = nn.Parameter(h, requires_grad=False)
                    ex._parameters[name] = p
                pair.append(p)
            self.host.append(pair)

    def to_gpu(self):
        for b, (gu, dn) in zip(self.blocks, self.host):
            b.experts._parameters["gate_up_proj"] = nn.Parameter(gu.data.cuda(), requires_grad=False)
            b.experts._parameters["down_proj"] = nn.Parameter(dn.data.cuda(), requires_grad=False)

    def to_host(self):
        for b, (gu, dn) in zip(self.blocks, self.host):
            b.experts._parameters["gate_up_proj"] = gu
            b.experts._parameters["down_proj"] = dn
        torch.cuda.empty_cache()


def hf_generate_rate(model, ids, new_tokens):
    """Decode tokens/s of transformers' generate(): time(new) - time(1) over new - 1 tokens."""
    kw = dict(do_sample=False, pad_token_id=0)

    def timed(n):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        return time.perf_counter() - t

    timed(4)
    t1, tn = timed(1), timed(new_tokens)
    return (new_tokens - 1) / max(tn - t1, 1e-9)


def profile_step(eng, steps=5):
    """Kernels per decode step and their summed GPU time, against the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    g = eng.graphs.get(eng, 256, 0)

    def replays():
        for _ in range(steps):
            eng.positions.fill_(40)  # stay inside the replayed sequence (and the KV bucket)
            g.replay()

    replays()
    sync()
    t = time.perf_counter()
    replays()
    sync()
    wall_ms = (time.perf_counter() - t) * 1000 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replays()
        sync()
    ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernels = [e for e in ev if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    busy = sum(e.device_time for e in kernels) / 1000 / steps
    by = {}
    for e in kernels:
        by[e.name[:60]] = by.get(e.name[:60], 0.0) + e.device_time / 1000 / steps
    top = sorted(by.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_ms": wall_ms, "kernels_per_step": len(kernels) / steps, "gpu_busy_ms": busy,
            "top": [(n, round(ms, 3)) for n, ms in top]}


def engine_row(model, cfg, trace, plan, label, budget_bytes, bpe, profile=False, fuse=True):
    memory_window()
    mem = {"before_attach": torch.cuda.memory_allocated()}
    try:
        eng = attach(model, cfg, device="cuda", fuse=fuse)
    except BudgetError as e:  # the allocator cap (memory.enforce_budget) refused: say so, go on
        return {"row": label, "tokens_per_s": float("nan"), "error": str(e), "budget": budget_bytes,
                "peak_alloc": peaks()[0], "peak_reserved": peaks()[1], "within_budget": False, "memory": mem}
    try:
        mem["after_attach"] = torch.cuda.memory_allocated()
        eng.use_replay(max(len(r) for r, _ in plan))
        eng.capture(1, max(len(r) for r, _ in plan) + 1)
        mem["after_capture"] = torch.cuda.memory_allocated()
        replay_generate(eng, trace, plan[:1])  # warm-up: caches warm like a running server
        eng.reset_stats()
        res = replay_generate(eng, trace, plan)
        st = eng.stats["total"]
        dec = dict(eng.sched.decode)
        alloc, reserved = peaks()
        mem["end_allocated"], mem["end_reserved"] = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        mem["pool"] = eng.pool.gate_up.numel() * 2 + eng.pool.down.numel() * 2
        mem["kv"] = sum(k.numel() * k.element_size() * 2 for k, _ in eng.kv.buffers.values())
        if profile:
            mem["profile"] = profile_step(eng)
    finally:
        eng.detach()
    n = max(res["decode_tokens"], 1)
    lookups = dec["hits"] + dec["misses"]
    return {"row": label, "tokens_per_s": res["decode_tokens"] / res["decode_s"],
            "hit_rate": dec["hits"] / lookups if lookups else 1.0, "misses_per_token": dec["misses"] / n,
            "bytes_per_token": dec["misses"] * bpe / n, "admitted_per_token": dec["admitted"] / n,
            "prefill_tokens_per_s": sum(p for _, p in plan) / res["prefill_s"],
            "peak_alloc": alloc, "peak_reserved": reserved, "budget": budget_bytes,
            "within_budget": budget_bytes is None or reserved <= budget_bytes, "slots": st["gpu_slots"],
            "memory": mem}


def eager_row(model, cfg, spec, trace, prompt_tokens, decode_tokens, label, budget_bytes):
    from tuner.validate import measure_one

    memory_window()
    handle = offload(model, cfg, device="cuda")
    try:
        measure_one(model, handle, spec, trace, device=torch.device("cuda"), replay=True,
                    prompt_tokens=prompt_tokens, max_decode_tokens=16)  # warm-up
        m = measure_one(model, handle, spec, trace, device=torch.device("cuda"), replay=True,
                        prompt_tokens=prompt_tokens, max_decode_tokens=decode_tokens)
        alloc, reserved = peaks()
    finally:
        handle.detach()
    st = m
    return {"row": label, "tokens_per_s": st["decode_tokens_per_s"], "hit_rate": st["hit_rate"],
            "misses_per_token": None, "bytes_per_token": st["bytes_per_token"], "peak_alloc": alloc,
            "peak_reserved": reserved, "budget": budget_bytes, "within_budget": reserved <= budget_bytes}


def median_row(runs):
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-moe")
    ap.add_argument("--budgets", nargs="+", default=["24GB", "12GB", "8GB"])
    ap.add_argument("--sweep-budgets", nargs="+", default=["24GB", "12GB", "8GB"])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager-runtime row")
    ap.add_argument("--no-transformers", action="store_true", help="skip the all-on-GPU transformers row")
    ap.add_argument("--extra-rows", nargs="*", default=["12GB:lfu:0", "8GB:lfu:0"],
                    help="more graph-engine rows, BUDGET:POLICY:READ_THROUGH_SLOTS (measured every round)")
    ap.add_argument("--sweep", action="store_true",
                    help="first, one pass over policies x read-through slots at each budget (a table)")
    ap.add_argument("--no-fuse", action="store_true",
                    help="also the all-resident row with the engine's kernel fusions off (fuse=False): an A/B in one run")
    ap.add_argument("--replay-seed", type=int, default=1,
                    help="seed of the replayed routing trace; the configs' priors come from the "
                         "profile's trace (seed 0), so the default replays routing they never saw")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from tuner.profiler import run_profile
    from tuner.validate import replay_schedule

    spec = resolve_model(args.model)
    prof = run_profile(spec, None, device="cpu", hardware="h200", progress=False)
    trace = prof.trace if args.replay_seed == 0 else run_profile(
        spec, None, device="cpu", hardware="h200", progress=False, seed=args.replay_seed).trace
    plan = replay_schedule(trace, args.prompt_tokens, args.new_tokens)
    priors = prof.priors()
    t0 = time.perf_counter()
    model = build_model(spec, device="cuda", dtype="bfloat16", seed=0, experts_on_host=True)
    experts = Experts(model)
    print(f"built {spec.name} on {torch.cuda.get_device_name()} in {time.perf_counter() - t0:.1f} s; "
          f"routing {prof.routing_kind} trace (replay seed {args.replay_seed}, priors from seed 0), {len(plan)} sequence(s), "
          f"{sum(len(r) - p for r, p in plan)} decode tokens", flush=True)
    gbps = pcie_gbps()
    print(f"pinned host->device: {gbps:.1f} GB/s", flush=True)
    bpe = spec.bytes_per_expert()
    L, E = spec.num_moe_layers, spec.num_experts
    big = plan_memory(spec, "141GB")
    rows = [("graph engine, every expert resident",
             default_config(spec, big, priors=priors).with_values({"cache.capacity_experts": L * E,
                                                                   "cache.read_through_slots": 0,
                                                                   "cache.policy": args.policy}), None)]
    if args.no_fuse:
        rows.append((NO_FUSE, rows[0][1], None))
    for budget in args.budgets:
        p = plan_memory(spec, budget)
        rows.append((f"graph engine @ {budget} (default config)", default_config(spec, p, priors=priors).with_values(
            {"cache.policy": args.policy}), p.budget_bytes))
    for extra in args.extra_rows:
        budget, policy, staging = extra.split(":")
        p = plan_memory(spec, budget)
        rows.append((f"graph engine @ {budget}, {policy}, {staging} read-through", default_config(
            spec, p, priors=priors).with_values({"cache.policy": policy, "cache.read_through_slots": int(staging)}),
            p.budget_bytes))
    ids = torch.randint(0, spec.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).cuda()
    sweep = []
    if args.sweep:
        for budget in args.sweep_budgets:
            p = plan_memory(spec, budget)
            for policy, staging in (("lru", 2), ("lfu", 0), ("lfu", 1), ("static", 0), ("static", 1)):
                cfg = default_config(spec, p, priors=priors).with_values(
                    {"cache.policy": policy, "cache.read_through_slots": staging})
                r = engine_row(model, cfg, trace, plan, f"{budget} {policy} rt={staging}", p.budget_bytes, bpe)
                sweep.append(r)
                print(f"sweep: {r['row']:<28} {r['tokens_per_s']:7.1f} tok/s hit {r['hit_rate']:.3f} "
                      f"miss/t {r['misses_per_token']:.1f}", flush=True)
    runs: dict[str, list[dict]] = {}
    fastest = None  # transformers' fastest experts backend, found in round 0
    for rnd in range(args.rounds):
        for label, cfg, budget in rows:
            r = engine_row(model, cfg, trace, plan, label, budget, bpe, profile=rnd == 0 and budget is None,
                           fuse=label != NO_FUSE)
            runs.setdefault(label, []).append(r)
            print(f"round {rnd}: {r}", flush=True)
        if not args.no_eager:
            p0 = plan_memory(spec, args.budgets[0])
            label = f"eager runtime @ {args.budgets[0]}"
            r = eager_row(model, default_config(spec, p0, priors=priors), spec, trace, args.prompt_tokens,
                          args.new_tokens, label, p0.budget_bytes)
            runs.setdefault(label, []).append(r)
            print(f"round {rnd}: {r}", flush=True)
        if not args.no_transformers:
            experts.to_gpu()
            backends = ("batched_mm", "grouped_mm") if rnd == 0 else (fastest,)
            for backend in backends:
                model.set_experts_implementation(backend)
                memory_window()
                rate = hf_generate_rate(model, ids, args.new_tokens)
                alloc, reserved = peaks()
                label = f"transformers all-on-GPU, {backend}, generate()"
                runs.setdefault(label, []).append({"row": label, "tokens_per_s": rate, "hit_rate": 1.0,
                                                   "misses_per_token": 0.0, "bytes_per_token": 0.0,
                                                   "peak_alloc": alloc, "peak_reserved": reserved, "budget": None})
                print(f"round {rnd}: {runs[label][-1]}", flush=True)
            experts.to_host()
            if rnd == 0:
                fastest = max(backends, key=lambda b: runs[f"transformers all-on-GPU, {b}, generate()"][0]["tokens_per_s"])
            model.set_experts_implementation("batched_mm")
    med = {label: median_row(rs) for label, rs in runs.items()}
    resident = med["graph engine, every expert resident"]
    step_ms = 1000.0 / resident["tokens_per_s"]
    for r in med.values():
        if r.get("error"):
            print(f"FAILED {r['row']}: {r['error']}")
        elif r["row"].startswith("graph engine"):
            floor_ms = step_ms + r["bytes_per_token"] / (gbps * 1e9) * 1000.0
            r["floor_tokens_per_s"] = 1000.0 / floor_ms
            r["x_floor"] = (1000.0 / r["tokens_per_s"]) / floor_ms
    hf = [r for label, r in med.items() if label.startswith("transformers")]
    best_hf = max(hf, key=lambda r: r["tokens_per_s"]) if hf else None
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": spec.name,
           "pcie_gbps": gbps, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "rounds": args.rounds, "rows": list(med.values()), "sweep": sweep}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    for r in med.values():
        if "memory" in r:
            m = {k: (round(v / 2**30, 3) if isinstance(v, (int, float)) else v) for k, v in r["memory"].items()
                 if k != "profile"}
            print(f"memory GiB {r['row']}: {m}")
            if "profile" in r["memory"]:
                print(f"profile {r['row']}: {r['memory']['profile']}")
    print_table(list(med.values()), best_hf)
    return 0


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows, best_hf):
    print(f"\n{'row':<52} {'tok/s':>7} {'min-max':>13} {'x HF':>5} {'hit':>6} {'miss/t':>6} {'MB/tok':>7} "
          f"{'floor':>7} {'x fl':>5} {'prefill':>7} {'peak alloc':>11} {'peak resv':>11} {'budget ok':>9}")
    for r in rows:
        mb = None if r.get("bytes_per_token") is None else r["bytes_per_token"] / 1e6
        each = r.get("tokens_per_s_runs")
        spread = f"{min(each):.1f}-{max(each):.1f}" if each and len(each) > 1 else "-"
        xhf = r["tokens_per_s"] / best_hf["tokens_per_s"] if best_hf else None
        print(f"{r['row'][:52]:<52} {r['tokens_per_s']:>7.1f} {spread:>13} {fmt(xhf, '5.2f'):>5} "
              f"{fmt(r.get('hit_rate'), '6.3f'):>6} {fmt(r.get('misses_per_token'), '6.1f'):>6} {fmt(mb, '7.1f'):>7} "
              f"{fmt(r.get('floor_tokens_per_s'), '7.1f'):>7} {fmt(r.get('x_floor'), '5.2f'):>5} "
              f"{fmt(r.get('prefill_tokens_per_s'), '7.1f'):>7} "
              f"{format_bytes(r['peak_alloc']):>11} {format_bytes(r['peak_reserved']):>11} "
              f"{str(r.get('within_budget', '-')):>9}")


if __name__ == "__main__":
    sys.exit(main())
