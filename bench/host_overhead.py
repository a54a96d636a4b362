"""Host cost of the offloaded runtime per decode step, measurable without a GPU.

At batch-1 decode the H200 runs host-bound: the GPU keeps pace with the Python that launches its
kernels (bench/decode.py, README "Benchmarks"). What ExpertFlow adds per MoE layer on the host
(the next-gate predictor, one device->host read, the scheduler's decisions, events) is then what
separates it from the all-on-GPU model. This script measures that cost on any device by keeping
the model's STRUCTURE (layers, experts, top-k, shared expert, attention heads ratio) and shrinking
its widths, so the arithmetic is negligible and the step time is host time:

    python bench/host_overhead.py --model qwen2-moe --rounds 5          # CPU: host cost only
    python bench/host_overhead.py --model qwen2-moe --device cuda       # on a GPU: + launches

Rows (all with every expert cached, so no copy is ever needed; then the 50% cache):
  un-offloaded model (transformers' batched_mm experts backend)
  ExpertFlow, prefetch off (LRU)                 -> the router read + scheduler + slot table
  ExpertFlow default config (prefetch depth 1)   -> + the next-gate predictor
  ExpertFlow default config, 50% cache           -> + misses: copies and evictions
Each row runs --rounds times, rounds interleaved. Host cost is deterministic work disturbed only
upward by other load, so the ratio and the extra host microseconds per MoE layer use each row's
fastest round; the median is shown beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertflow.budget import plan_memory  # noqa: E402
from expertflow.config import default_config  # noqa: E402
from expertflow.registry import ModelSpec, resolve_model  # noqa: E402
from expertflow.runtime.generate import greedy_generate  # noqa: E402
from expertflow.runtime.loading import build_model  # noqa: E402
from expertflow.runtime.offload import offload  # noqa: E402

# Widths that make the arithmetic negligible; every count that drives host work is kept.
NARROW = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
          "shared_expert_intermediate_size": 64, "vocab_size": 512, "head_dim": 16,
          "num_attention_heads": 4, "num_key_value_heads": 2}


def narrow_spec(name: str) -> ModelSpec:
    spec = resolve_model(name)
    cfg = dict(spec.config)
    cfg.update({k: v for k, v in NARROW.items() if k in cfg or k == "head_dim"})
    return ModelSpec(f"{spec.name} (narrow)", spec.architecture, cfg, None, False, None,
                     f"{spec.name} structure with widths {NARROW}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-moe")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # host cost of one Python thread, as on the GPU host
    spec = narrow_spec(args.model)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    model = build_model(spec, device=args.device, dtype=dtype, seed=0,
                        experts_on_host=args.device == "cuda")
    model.set_experts_implementation("batched_mm")
    ids = torch.randint(0, spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    plan = plan_memory(spec, "4GiB", max_context_tokens=512, prefill_chunk_tokens=64, dtype=dtype)
    base = default_config(spec, plan, device=args.device, dtype=dtype)
    everything = spec.num_moe_layers * spec.num_experts
    rows = {
        "un-offloaded model": None,
        "ExpertFlow, prefetch off (LRU), all cached": base.with_values(
            {"prefetch.depth": 0, "cache.capacity_experts": everything}),
        "ExpertFlow default config, all cached": base.with_values({"cache.capacity_experts": everything}),
        "ExpertFlow default config, 50% cache": base.with_values(
            {"cache.capacity_experts": everything // 2}),
    }
    if args.device == "cuda":
        model.to("cuda")  # the un-offloaded rows need every expert on the GPU
    ms: dict[str, list[float]] = {label: [] for label in rows}

    def step_ms() -> float:
        greedy_generate(model, ids, 4)  # warm-up: caches, allocator, first touch
        res = greedy_generate(model, ids, args.tokens)
        return 1000.0 * res.decode_s / max(args.tokens - 1, 1)

    for _ in range(args.rounds):
        for label, cfg in rows.items():
            if cfg is None:
                ms[label].append(step_ms())
                continue
            with offload(model, cfg):
                ms[label].append(step_ms())
    L = spec.num_moe_layers
    ref = min(ms["un-offloaded model"])
    print(f"\n{spec.name}: {L} MoE layers x {spec.num_experts} experts, top-{spec.top_k}; "
          f"{args.device}, {args.tokens} tokens, {args.rounds} interleaved rounds, torch {torch.__version__}")
    print(f"{'row':<46} {'ms/step min':>11} {'median':>8} {'ratio':>6} {'+us/MoE layer':>14}")
    for label, values in ms.items():
        best = min(values)
        print(f"{label:<46} {best:>11.3f} {statistics.median(values):>8.3f} {best / ref:>6.3f} "
              f"{1000.0 * (best - ref) / L:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
