"""Re-predict the 8 validated configs of bench/validate_gpu.py's H200 run with the current
simulator, from the costs measured in that same run (its profile tables and runtime calibration:
host 2.298 ms per MoE layer, step overhead 1.13 ms, sync 0.052 ms, expert copy 0.348 ms), and
compare with the throughput measured there. The synthetic trace is regenerated (seeded).

    python bench/revalidate_offline.py
"""
import json, dataclasses, numpy as np, pandas as pd, torch, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from expertflow.registry import resolve_model
from tuner.profiler import run_profile
from tuner.simulator import Costs, simulate
from validate_gpu import spread_configs, spearman
spec = resolve_model("qwen2-moe")
prof = run_profile(spec, None, hardware="h200", progress=False)
d = "bench/results/h200-2026-11-29/qwen2-moe-profile"
lt, kt = pd.read_parquet(f"{d}/layer.parquet"), pd.read_parquet(f"{d}/kernel.parquet")
costs = Costs(copy_ms=0.348, layer_ms=tuple(zip(lt.tokens, lt.median_ms)), kernel_ms=tuple(zip(kt.tokens, kt.median_ms)),
              host_layer_ms=2.298, sync_ms=0.052, step_overhead_ms=1.13, num_decoder_layers=spec.num_layers)
tr = dataclasses.replace(prof.trace, weights=torch.from_numpy(prof.trace.weights).to(torch.bfloat16).float().numpy())
meas = json.load(open("bench/results/h200-2026-11-29/validate.json"))["rows"]
rows = []
for (label, cfg), m in zip(spread_configs(spec, prof.priors()), meas):
    assert label == m["label"]
    p = simulate(tr, costs, cfg, prompt_tokens=16, max_decode_tokens=128).metrics
    mm = m["measured"]
    rows.append((label, m["predicted"]["decode_tokens_per_s"], p["decode_tokens_per_s"], mm["decode_tokens_per_s"], p["hit_rate"], mm["hit_rate"], p["stall_ms_per_token"], mm["stall_ms_per_token"]))
print(f"{'config':<58} {'old pred':>8} {'new pred':>8} {'measured':>8} {'error':>7} {'hit p/m':>11} {'stall p/m':>11}")
for r in rows:
    print(f"{r[0][:58]:<58} {r[1]:>8.2f} {r[2]:>8.2f} {r[3]:>8.2f} {(r[3]-r[2])/r[2]:>+7.1%} {r[4]:.3f}/{r[5]:.3f} {r[6]:5.2f}/{r[7]:5.2f}")
new = [r[2] for r in rows]; ms = [r[3] for r in rows]
errs = [abs(b-a)/a for a, b in zip(new, ms)]
print("max |err| %.1f%%  mean |err| %.1f%%  Spearman %.3f;  without the first (warm-up) row: max %.1f%% Spearman %.3f" % (100*max(errs), 100*np.mean(errs), spearman(new, ms), 100*max(errs[1:]), spearman(new[1:], ms[1:])))
