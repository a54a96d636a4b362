"""`ef-profile`: profile a model and this machine into a versioned profile folder, then say
what was measured (or print it as JSON)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from expertflow.errors import ExpertFlowError
from expertflow.fsutil import claim_out_dir
from tuner.profile import is_profile_file
from tuner.profiler import profile_summary, run_profile

from .common import (
    examples_epilog,
    models_epilog,
    new_parser,
    positive_int,
    run_handler,
)


def build_profile_parser() -> argparse.ArgumentParser:
    p = new_parser("ef-profile", "Profile a MoE model and this machine: per-expert activation "
                                 "frequency, host->device transfer latency, expert kernel time, "
                                 "hardware. Writes a versioned profile directory.",
                   extra_epilog=[examples_epilog([
                       "ef-profile --model qwen2-moe --out prof/qwen2-moe",
                       "ef-profile --model ./my-checkpoint --out prof/mine --prompts prompts.txt --quick"]),
                       models_epilog()])
    p.add_argument("--model", required=True, help="registry alias (e.g. qwen2-moe) or local "
                                                  "Hugging Face checkpoint directory")
    p.add_argument("--prompts", default=None, help="prompt file: text (one prompt per blank-line "
                                                   "separated block) or JSONL with a 'prompt' field "
                                                   "(default: the embedded prompt set)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where to measure (default: cuda if present, else cpu)")
    p.add_argument("--out", required=True, help="output profile directory (new, empty, or a profile "
                                                "written before, which is replaced)")
    p.add_argument("--force", action="store_true",
                   help="write into an --out folder that holds other files (they are kept)")
    p.add_argument("--routing", default="auto", choices=["auto", "real", "synthetic"],
                   help="real = run the model's router (needs weights); synthetic = calibrated "
                        "generator (default: real when weights exist)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="cap on routed tokens to record (default: all prompts)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and synthetic routing "
                                                        "(default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_handler("ef-profile", build_profile_parser(), handle, argv)


def handle(args: argparse.Namespace) -> int:
    """--out is checked first, before any work; a failed run leaves it as it was found."""
    folder = claim_out_dir(args.out, is_profile_file, force=args.force, what="ef-profile")
    try:
        profile = run_profile(args.model, out=args.out, prompts=args.prompts, device=args.device,
                              routing=args.routing, max_tokens=args.max_tokens, quick=args.quick,
                              seed=args.seed, force=args.force)
    except (ExpertFlowError, KeyboardInterrupt):
        folder.restore()
        raise
    s = profile_summary(profile)
    if args.json:
        print(json.dumps(s))
        return 0
    h = s["summary"]
    print(f"profile {s['profile_id']} written to {s['profile_dir']} ({s['elapsed_s']:.1f} s)")
    print(f"routing: {s['routing']} - {s['routing_note']}")
    print(f"timing: {s['timing']} on {s['gpu_name'] or s['device']}")
    if s["timing_noisy"]:
        noise = profile.meta.timing.noise
        print(f"  WARNING: timing too noisy to rank configs ({'; '.join(noise.reasons)}); re-profile "
              "with nothing else running on this machine")
    print(f"  host->device pinned {h['pinned_gbps']:.1f} GB/s (1 GiB copy {h.get('pinned_1gib_gbps', 0):.1f}), "
          f"pageable {h['pageable_gbps']:.1f} GB/s; one expert {h['expert_copy_ms']:.3f} ms")
    print(f"  expert kernel {h['expert_kernel_ms']:.3f} ms at 1 token; layer (non-expert) "
          f"{h['layer_ms']:.3f} ms; decode per MoE layer {h.get('decode_layer_ms', float('nan')):.3f} ms")
    print(f"  busiest 25% of experts carry {h['top25_traffic_share_mean']:.0%} of traffic; LRU hit at "
          f"25% capacity {h['lru_hit_25_mean']:.0%}")
    return 0
