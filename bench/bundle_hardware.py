"""Measure timing on this GPU for every real registry model and bundle it with the package, so
that `ef-tune --hardware <name>` (and ef-tune on a machine without a GPU) tunes for this GPU.

Run on the GPU machine (the lead runs it on the H200), from the repository root:

    . bench/gpu_env.sh && python3 bench/bundle_hardware.py --name h200

Writes tuner/data/hardware/<name>/<alias>/{hardware.yaml, transfer,kernel,layer,runtime.parquet}
(tuner/profiler/bundled.py). The host->device size sweep and the 1 GiB copy are measured once
and shared; each model adds its own expert size, the expert kernel, the non-expert layer and
the runtime's decode step on reduced-depth models at the real dims (random bf16 weights).
Prints one table row per model at the end. Target: < 6 minutes on an H200 for all six models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REAL_MODELS = ("qwen2-moe", "qwen2-57b-a14b", "mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b",
               "deepseek-v2-lite")


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from expertflow.registry import resolve_model
    from tuner.profiler.bundled import hardware_root, save_bundled
    from tuner.profiler.hardware import collect_hardware
    from tuner.profiler.timing import (CONCURRENCY, GIB, SIZES_BYTES, measure_big_copy_gbps,
                                       measure_timing, measure_transfer, timing_summary)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="h200", help="bundle name (default h200)")
    ap.add_argument("--models", nargs="+", default=list(REAL_MODELS),
                    help="registry aliases or checkpoint directories (default: the real aliases)")
    ap.add_argument("--root", default=None, help="bundle root (default tuner/data/hardware)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test of this script)")
    ap.add_argument("--json", default=None, help="also write the summary rows to this JSON file")
    ap.add_argument("--engine-only", action="store_true",
                    help="keep each model's bundled tables and (re)measure only the graph engine's "
                         "(tuner/profiler/engine_timing.py) into them")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bundle_hardware.py: error: no CUDA GPU here; run it on the GPU machine", file=sys.stderr)
        return 7
    dev = torch.device("cuda")
    dtype = "bfloat16"
    root = Path(args.root) if args.root else hardware_root()
    t_all = time.perf_counter()
    if args.engine_only:
        return engine_only(args, dev, dtype, root, t_all)
    hw = collect_hardware(dev)
    t0 = time.perf_counter()
    base = measure_transfer(dev, SIZES_BYTES, CONCURRENCY, reps=5 if args.quick else 15)
    gib = measure_big_copy_gbps(dev, GIB, reps=3)
    print(f"shared transfer sweep + 1 GiB copy: {time.perf_counter() - t0:.1f} s "
          f"(1 GiB pinned {gib:.1f} GB/s)", flush=True)
    rows = []
    for alias in args.models:
        spec = resolve_model(alias)
        t0 = time.perf_counter()
        res = measure_timing(spec, device=dev, dtype=dtype, quick=args.quick, base_transfer=base,
                             pinned_1gib_gbps=gib)
        bpe = spec.bytes_per_expert(dtype)
        summary = timing_summary(res.tables, bpe)
        key = Path(alias).name if spec.checkpoint else alias  # a checkpoint is found by fingerprint
        save_bundled(args.name, key, fingerprint=spec.fingerprint, dtype=dtype, bytes_per_expert=bpe,
                     hardware=hw, timing={"kind": res.kind, "note": res.note}, summary=summary,
                     tables=res.tables, root=root)
        dt = time.perf_counter() - t0
        rows.append({"model": alias, "seconds": round(dt, 1), "bytes_per_expert": bpe, **summary})
        print(f"{alias}: {dt:.1f} s", flush=True)
        torch.cuda.empty_cache()
    total = time.perf_counter() - t_all
    print(f"\nbundled {len(rows)} models as {args.name!r} under {root} in {total:.0f} s on "
          f"{hw.get('gpu_name')} (PCIe gen {hw.get('pcie_generation')} x{hw.get('pcie_width')}, "
          f"driver {hw.get('driver_version')}, CUDA {hw.get('cuda_version')})")
    head = (f"{'model':<18}{'s':>6}{'MiB/exp':>9}{'copy ms':>9}{'pin GB/s':>9}{'1GiB':>7}"
            f"{'page GB/s':>10}{'kern ms':>9}{'layer ms':>9}{'dec/layer':>10}{'step+':>8}{'sync ms':>9}")
    print(head)
    for r in rows:
        print(f"{r['model']:<18}{r['seconds']:>6.1f}{r['bytes_per_expert'] / 2**20:>9.1f}"
              f"{r['expert_copy_ms']:>9.3f}{r['expert_pinned_gbps']:>9.1f}{r['pinned_1gib_gbps']:>7.1f}"
              f"{r['expert_pageable_gbps']:>10.1f}{r['expert_kernel_ms']:>9.3f}{r['layer_ms']:>9.3f}"
              f"{r.get('decode_layer_ms', float('nan')):>10.3f}{r.get('step_overhead_ms', float('nan')):>8.2f}"
              f"{r.get('sync_ms', float('nan')):>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw, "rows": rows, "seconds": total}, indent=1))
    return 0


def engine_only(args, dev, dtype: str, root: Path, t_all: float) -> int:
    """--engine-only: the graph engine's timing into each model's existing bundle entry."""
    import pandas as pd
    import yaml

    from expertflow.registry import resolve_model
    from tuner.profiler.bundled import load_bundled, save_bundled
    from tuner.profiler.engine_timing import measure_engine
    from tuner.profiler.timing import timing_summary

    rows = []
    for alias in args.models:
        spec = resolve_model(alias)
        t0 = time.perf_counter()
        hw, tables = load_bundled(args.name, spec, root)
        key = hw["bundle_model"]
        meta = yaml.safe_load((root / args.name / key / "hardware.yaml").read_text())
        values, grid = measure_engine(spec, device=dev, dtype=dtype, quick=args.quick)
        rt = tables["runtime"]
        rt = rt[~rt["name"].str.startswith("engine_")]
        tables["runtime"] = pd.concat([rt, pd.DataFrame({"name": list(values), "value": list(values.values())})],
                                      ignore_index=True)
        tables["engine"] = grid
        bpe = spec.bytes_per_expert(dtype)
        summary = {**timing_summary(tables, bpe), **{k: round(float(v), 6) for k, v in values.items()}}
        for k in ("source", "bundle_model", "bundle_dtype", "bundle_created_at", "bundle_timing_note"):
            hw.pop(k, None)
        save_bundled(args.name, key, fingerprint=spec.fingerprint, dtype=dtype, bytes_per_expert=bpe,
                     hardware=meta.get("hardware") or hw, timing=meta.get("timing") or {}, summary=summary,
                     tables=tables, root=root)
        L = spec.num_moe_layers
        step = values["engine_step_overhead_ms_b1"] + L * values["engine_layer_ms_b1"]
        one = grid[(grid["tokens"] == 1)]
        miss = float(one[(one["hits"] == 0) & (one["misses"] == 1)]["median_ms"].iloc[0]
                     - one[(one["hits"] == 1) & (one["misses"] == 0)]["median_ms"].iloc[0])
        rows.append({"model": alias, "seconds": round(time.perf_counter() - t0, 1), "step_ms_b1": step,
                     "layer_ms_b1": values["engine_layer_ms_b1"], "miss_ms": miss,
                     "zc_gbps": bpe / (miss * 1e6) if miss > 0 else float("nan"),
                     "host_layer_ms": values["engine_host_layer_ms"]})
        print(f"{alias}: engine timing in {rows[-1]['seconds']} s", flush=True)
        torch_free()
    print(f"\ngraph-engine timing for {len(rows)} models into {root / args.name} in "
          f"{time.perf_counter() - t_all:.0f} s")
    print(f"{'model':<18}{'s':>6}{'step ms':>9}{'layer ms':>9}{'miss ms':>9}{'zc GB/s':>9}{'host/layer':>11}")
    for r in rows:
        print(f"{r['model']:<18}{r['seconds']:>6.1f}{r['step_ms_b1']:>9.3f}{r['layer_ms_b1']:>9.4f}"
              f"{r['miss_ms']:>9.3f}{r['zc_gbps']:>9.1f}{r['host_layer_ms']:>11.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


def torch_free() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
