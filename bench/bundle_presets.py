"""Calibrate the synthetic-routing preset of every registry model and ship the fits in
tuner/data/synthetic_presets.json, so ef-profile / ef-tune without weights skip the 2-20 s fit.

    python bench/bundle_presets.py          # rewrites the file (atomically)

The file maps `tuner.synthetic.preset_key(...)` (family targets, dims, CALIBRATION_VERSION) to
the fitted SyntheticParams; a key made by other targets or another version is never used.
tests/tuner/test_synthetic.py re-fits one model and checks it equals the bundled entry.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertflow.fsutil import atomic_write_text  # noqa: E402
from expertflow.registry import known_models, resolve_model  # noqa: E402
from tuner import synthetic  # noqa: E402


def dims(spec) -> dict:
    return {"num_layers": spec.num_moe_layers, "num_experts": spec.num_experts, "top_k": spec.top_k,
            "normalize_topk": spec.norm_topk_prob}


def main() -> int:
    out = {}
    for name in known_models():
        spec = resolve_model(name)
        if spec.tiny:
            continue
        family = synthetic.family_of(spec.architecture)
        t0 = time.perf_counter()
        p = synthetic.calibrate_preset(family, **dims(spec))
        out[synthetic.preset_key(family, **dims(spec))] = synthetic.params_to_json(p)
        print(f"{name:<18} {family:<12} fitted in {time.perf_counter() - t0:5.1f} s: {p.as_dict()['fit_error']}",
              flush=True)
    path = Path(synthetic.__file__).parent / synthetic.BUNDLED_PRESETS
    atomic_write_text(path, json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(out)} presets to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
