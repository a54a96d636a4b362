"""Held-out quality: does ef-tune's choice stay within --max-quality-loss on prompts it never saw?

    python3 bench/heldout_quality.py [--checkpoint ../shared/models/pydocs-moe] [--cap 0.02]

Splits the checkpoint's prompts.jsonl in two halves; runs ef-tune (CPU, --prompts = the first
half: its trace and its quality table) with the cap; then measures the chosen config's adaptive-k
(threshold, min_k, renormalize) for real on the second half (tuner.quality.measure_quality: the
relative perplexity increase against full top-k) and prints both, with the cap.

By default the search space leaves exact top-k out (adaptive_k.threshold 0.50..0.95), so the
choice must drop experts and the cap is what bounds it (with threshold 1.0 searchable, a CPU
timing profile of this small model often prefers exact top-k, and the check says nothing);
--full-space searches the packaged space instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(Path(__file__).resolve().parents[2] / "shared/models/pydocs-moe"))
    ap.add_argument("--cap", type=float, default=0.02)
    ap.add_argument("--budget", default="0.315GB")  # ~45 of its 256 experts fit
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--full-space", action="store_true", help="the packaged search space (threshold 1.0 included)")
    args = ap.parse_args(argv)
    import yaml

    from expertflow.registry import resolve_model
    from efcli.tune import main as tune_main
    from tuner.quality import measure_quality, prompt_ids
    from tuner.records import TuningRecord

    ck = Path(args.checkpoint)
    lines = [x for x in (ck / "prompts.jsonl").read_text().splitlines() if x.strip()]
    half = len(lines) // 2
    work = Path(tempfile.mkdtemp(prefix="ef-heldout-"))
    (work / "tune.jsonl").write_text("\n".join(lines[:half]) + "\n")
    (work / "heldout.jsonl").write_text("\n".join(lines[half:]) + "\n")
    space = []
    if not args.full_space:
        (work / "space.yaml").write_text(yaml.safe_dump({"version": 1, "params": {
            "adaptive_k.threshold": {"type": "float", "low": 0.5, "high": 0.95, "step": 0.05},
            "adaptive_k.min_k": {"type": "int", "low": 1, "high": 2},
            "cache.capacity_experts": {"type": "int", "low": "layers", "high": "budget"},
            "cache.policy": {"type": "categorical", "choices": ["lru", "lfu", "static"]}}}))
        space = ["--search-space", str(work / "space.yaml")]
    rc = tune_main(["--model", str(ck), "--budget", args.budget, "--max-quality-loss", str(args.cap),
                    "--prompts", str(work / "tune.jsonl"), "--trials", str(args.trials), "--device", "cpu",
                    "--no-validate", "--no-report", "--out", str(work / "out"), *space])
    if rc != 0:
        return rc
    cfg = yaml.safe_load((work / "out" / "config.yaml").read_text())
    ak = cfg["adaptive_k"]
    predicted = TuningRecord.load(work / "out").chosen.predicted.get("quality_loss")
    spec = resolve_model(str(ck))
    ids = prompt_ids(spec, str(work / "heldout.jsonl"))
    t = measure_quality(spec, [float(ak["threshold"])], prompts=ids, renormalize=bool(ak["renormalize"]),
                        min_k=int(ak["min_k"]))
    held = t.loss_table().get(float(ak["threshold"]), 0.0)
    print(f"chosen adaptive-k {ak}: quality loss predicted {predicted} on the tuning half, measured "
          f"{held:.4f} on {len(ids)} held-out prompts; cap {args.cap}: "
          f"{'WITHIN' if held <= args.cap else 'OVER'} the cap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
