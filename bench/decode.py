"""Decode benchmark on one GPU, all rows in ONE run (same weights, same prompt, same machine state).

Qwen1.5-MoE-A2.7B dims (`qwen2-moe`), random bf16 weights, batch 1, 32-token prompt, greedy.
Rows:
  transformers all-on-GPU, each experts backend (generate())     -> the baseline to beat
  transformers all-on-GPU, batched_mm, our decode loop             -> isolates the loop's share
  transformers + accelerate device_map, max_memory = budget        -> the offloading baseline
  ExpertFlow LRU, no prefetch, at each budget
  ExpertFlow default config (default_config), at each budget
  ExpertFlow tuned config (--config FILE ...), if given
Every ExpertFlow and all-on-GPU row is measured --rounds times (default 3), the offloaded and the
all-on-GPU phases alternating, and shows its median round and the min-max over rounds: the GPU
host is shared and its speed drifts between runs, and a single first row once came out at half
speed. Columns: decode tokens/s (median, min-max), hit rate, stall ms/token, bytes moved/token, peak GPU memory
(allocated and reserved, measured from attach to the end of decode).

    python bench/decode.py --budgets 24GB 12GB --new-tokens 128 --json $OUT/decode.json

accelerate rows decode --accelerate-tokens tokens (default 12): at ~1 token/s a full 128 would
take minutes per row; its per-token cost is constant (it streams every offloaded layer per token).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertflow.budget import format_bytes, parse_size, plan_memory  # noqa: E402
from expertflow.config import default_config, load_config  # noqa: E402
from expertflow.registry import resolve_model  # noqa: E402
from expertflow.runtime.generate import greedy_generate  # noqa: E402
from expertflow.runtime.loading import build_model, experts_to_host  # noqa: E402
from expertflow.runtime.offload import offload  # noqa: E402


def sync():
    torch.cuda.synchronize()


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

    timed(4)  # warm-up
    t1, tn = timed(1), timed(new_tokens)
    return (new_tokens - 1) / max(tn - t1, 1e-9)


def ours_rate(model, ids, new_tokens):
    greedy_generate(model, ids, 8)  # warm-up
    res = greedy_generate(model, ids, new_tokens)
    return res.decode_tokens_per_s, res


def memory_window():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peaks():
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def median_row(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle one for an even count), with the
    spread of all runs: tokens_per_s_runs lists every round's value."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    return row


def ef_row(model, cfg, ids, new_tokens, label, budget_bytes):
    memory_window()
    handle = offload(model, cfg)
    try:
        memory_window()
        greedy_generate(model, ids, 8)  # warm-up (also warms the cache like a running server)
        handle.reset_stats()
        res = greedy_generate(model, ids, new_tokens)
        st = handle.stats["total"]
        alloc, reserved = peaks()
    finally:
        handle.detach()
    steps = max(new_tokens - 1, 1)
    return {"row": label, "tokens_per_s": res.decode_tokens_per_s, "hit_rate": st["hit_rate"],
            "stall_ms_per_token": st["stall_ms"] / new_tokens,
            "bytes_per_token": st["bytes_moved"] / new_tokens,
            "peak_alloc": alloc, "peak_reserved": reserved, "budget": budget_bytes,
            "within_budget": reserved <= budget_bytes,
            "prefetch_issued_per_token": st["prefetch_issued"] / steps,
            "prefetch_used": st["prefetch_used"], "slots": st["gpu_slots"]}


def accelerate_row(model, ids, budget, tokens, label):
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    model.to("cpu")
    memory_window()
    dmap = infer_auto_device_map(model, max_memory={0: budget, "cpu": "400GiB"},
                                 no_split_module_classes=model._no_split_modules)
    dispatch_model(model, device_map=dmap)
    try:
        rate = hf_generate_rate(model, ids.to("cuda:0"), tokens)
        alloc, reserved = peaks()
    finally:
        remove_hook_from_module(model, recurse=True)
        model.to("cpu")
    on_gpu = sum(1 for v in dmap.values() if v == 0)
    return {"row": label, "tokens_per_s": rate, "hit_rate": None, "stall_ms_per_token": None,
            "bytes_per_token": None, "peak_alloc": alloc, "peak_reserved": reserved,
            "budget": parse_size(budget).bytes, "modules_on_gpu": on_gpu, "tokens_measured": tokens}


def profile_host(model, cfg, ids):
    import cProfile
    import pstats

    with offload(model, cfg):
        greedy_generate(model, ids, 8)
        prof = cProfile.Profile()
        prof.enable()
        greedy_generate(model, ids, 17)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-moe")
    ap.add_argument("--budgets", nargs="+", default=["24GB", "12GB"])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--accelerate-tokens", type=int, default=12)
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--config", nargs="*", default=[], help="tuned config.yaml files (label = parent dir)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure every ExpertFlow and all-on-GPU row this many times, alternating the "
                         "two phases; the table shows each row's median round and its min-max")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-host", action="store_true",
                    help="also print where the host time of 16 ExpertFlow decode steps goes (cProfile)")
    args = ap.parse_args(argv)
    spec = resolve_model(args.model)
    t0 = time.perf_counter()
    # Experts in pinned host memory from the start: ExpertFlow rows attach/detach without copies.
    model = build_model(spec, device="cuda", dtype="bfloat16", seed=0, experts_on_host=True)
    print(f"built {spec.name} on {torch.cuda.get_device_name()} in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = torch.randint(0, spec.vocab_size, (1, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0)).cuda()
    model.set_experts_implementation("batched_mm")
    # Warm-up row (discarded): first CUDA/cuBLAS use, pinned-memory first touch.
    ef_row(model, default_config(spec, plan_memory(spec, args.budgets[0])), ids, 16, "warm-up", 0)
    ef_rows = []  # (label, config, budget bytes)
    for budget in args.budgets:
        plan = plan_memory(spec, budget)
        base = default_config(spec, plan)
        ef_rows += [(f"ExpertFlow LRU, no prefetch @ {budget}", base.with_values({"prefetch.depth": 0}),
                     plan.budget_bytes),
                    (f"ExpertFlow default config @ {budget}", base, plan.budget_bytes)]
    for path in args.config:
        cfg = load_config(path)
        ef_rows.append((f"ExpertFlow tuned ({Path(path).parent.name}) @ {cfg.memory.budget_text}", cfg,
                        cfg.memory.budget_bytes))
    # Rounds alternate the offloaded phase and the all-on-GPU phase, so a drift of the shared host
    # between phases shows as spread instead of as a ratio; each row reports its median round.
    runs: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for label, cfg, budget_bytes in ef_rows:
            runs.setdefault(label, []).append(ef_row(model, cfg, ids, args.new_tokens, label, budget_bytes))
            print(f"round {rnd}: {runs[label][-1]}", flush=True)
        if rnd == 0 and args.profile_host:
            profile_host(model, default_config(spec, plan_memory(spec, args.budgets[0])), ids)
        model.to("cuda")  # the whole model resident: the baseline to beat
        for backend in ("batched_mm", "grouped_mm", "eager"):
            model.set_experts_implementation(backend)
            memory_window()
            rate = hf_generate_rate(model, ids, args.new_tokens)
            alloc, reserved = peaks()
            label = f"transformers all-on-GPU, {backend}, generate()"
            runs.setdefault(label, []).append(
                {"row": label, "tokens_per_s": rate, "hit_rate": 1.0, "stall_ms_per_token": 0.0,
                 "bytes_per_token": 0.0, "peak_alloc": alloc, "peak_reserved": reserved, "budget": None})
            print(f"round {rnd}: {runs[label][-1]}", flush=True)
        model.set_experts_implementation("batched_mm")
        memory_window()
        rate, _ = ours_rate(model, ids, args.new_tokens)
        alloc, reserved = peaks()
        label = "transformers all-on-GPU, batched_mm, our decode loop"
        runs.setdefault(label, []).append(
            {"row": label, "tokens_per_s": rate, "hit_rate": 1.0, "stall_ms_per_token": 0.0,
             "bytes_per_token": 0.0, "peak_alloc": alloc, "peak_reserved": reserved, "budget": None})
        print(f"round {rnd}: {runs[label][-1]}", flush=True)
        if rnd + 1 < args.rounds:
            experts_to_host(model)
            model.set_experts_implementation("batched_mm")
    medians = {label: median_row(rs) for label, rs in runs.items()}
    base_rows = [r for label, r in medians.items() if label.startswith("transformers")]
    rows = [r for label, r in medians.items() if not label.startswith("transformers")]
    fastest = max((r for r in base_rows if r["row"].endswith("generate()")),
                  key=lambda r: r["tokens_per_s"])["row"].split(", ")[1]
    rows = base_rows + rows
    if not args.skip_accelerate:
        model.set_experts_implementation(fastest)
        for budget in args.budgets:
            rows.append(accelerate_row(model, ids, budget, args.accelerate_tokens,
                                       f"transformers + accelerate max_memory={budget}"))
            print(rows[-1], flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": spec.name,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print_table(rows)
    return 0


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    print(f"\n{'row':<58} {'tok/s':>7} {'min-max':>13} {'hit':>6} {'stall ms/t':>10} {'MB/tok':>8} "
          f"{'peak alloc':>11} {'peak resv':>11}")
    for r in rows:
        mb = None if r["bytes_per_token"] is None else r["bytes_per_token"] / 1e6
        each = r.get("tokens_per_s_runs")
        spread = f"{min(each):.2f}-{max(each):.2f}" if each and len(each) > 1 else "-"
        print(f"{r['row'][:58]:<58} {r['tokens_per_s']:>7.2f} {spread:>13} {fmt(r['hit_rate'], '6.3f'):>6} "
              f"{fmt(r['stall_ms_per_token'], '10.2f'):>10} {fmt(mb, '8.1f'):>8} "
              f"{format_bytes(r['peak_alloc']):>11} {format_bytes(r['peak_reserved']):>11}")

if __name__ == "__main__":
    sys.exit(main())
