"""Quality side of adaptive-k: dropped gate mass from traces, measured perplexity / KL with real
weights (tiny random model, and the trained pydocs-moe when present)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tuner import quality


def test_dropped_mass_table_is_torch_free_and_monotone():
    code = ("import sys, _tuner_fixtures as fx\n"
            "from expertflow.registry import resolve_model\n"
            "from tuner.quality import dropped_mass_table\n"
            "rows = dropped_mass_table(fx.synthetic_trace(resolve_model('tiny-qwen3-moe')))\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print([(r['threshold'], r['dropped_mass'], r['activated_per_token']) for r in rows])\n")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__)] + sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = eval(out.stdout.strip())
    ths = [r[0] for r in rows]
    assert ths == sorted(quality.THRESHOLDS)
    dropped = [r[1] for r in rows]  # ascending thresholds: dropped mass falls to 0 at 1.0
    assert dropped[-1] == 0.0 and all(a >= b for a, b in zip(dropped, dropped[1:])) and dropped[0] > 0.05
    active = [r[2] for r in rows]
    assert active[-1] == 4 * 4 and all(a <= b for a, b in zip(active, active[1:]))


def test_measure_quality_on_a_tiny_model_matches_the_plain_model_at_threshold_one():
    import torch

    from expertflow.registry import resolve_model
    from expertflow.runtime.loading import build_model

    spec = resolve_model("tiny-qwen2-moe")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, spec.vocab_size, (6, 24), generator=g).tolist()
    model = build_model(spec, device="cpu", dtype="float32", seed=1)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(prompts), use_cache=False).logits[:, :-1]
        tgt = torch.tensor(prompts)[:, 1:]
        nll = -torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1)).mean()
    table = quality.measure_quality(spec, (0.5, 0.8, 1.0), prompts=prompts, model=model, batch_size=4)
    full = table.row(1.0)
    assert full["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert full["perplexity_change"] == 0.0 and full["kl"] == 0.0 and full["dropped_mass"] == 0.0
    low = table.row(0.5)
    assert low["kl"] > 0 and low["dropped_mass"] > 0.3  # near-uniform random gates: ~half dropped
    assert low["dropped_mass"] >= table.row(0.8)["dropped_mass"] >= 0
    assert table.tokens == 6 * 23
    assert set(table.loss_table()) == {0.5, 0.8, 1.0} and min(table.loss_table().values()) >= 0


# ---- pydocs-moe (trained weights) -------------------------------------------------------------
PYDOCS_PROMPTS = 32


@pytest.fixture
def pydocs_prompts(pydocs):
    from expertflow.registry import resolve_model

    spec = resolve_model(pydocs)
    return spec, quality.prompt_ids(spec, n_prompts=PYDOCS_PROMPTS)


def test_pydocs_perplexity_table_grows_as_the_threshold_falls(pydocs_prompts):
    spec, prompts = pydocs_prompts
    table = quality.measure_quality(spec, quality.THRESHOLDS, prompts=prompts)
    print("\n" + quality.format_table(table.rows))
    rows = table.rows  # ascending thresholds 0.5 .. 1.0
    assert [r["threshold"] for r in rows] == list(quality.THRESHOLDS)
    assert rows[-1]["perplexity_change"] == 0.0 and rows[-1]["kl"] == 0.0
    change = [r["perplexity_change"] for r in rows]
    # monotone-ish: every lower threshold costs at least what the next higher one does, up to noise
    assert all(a >= b - 0.003 for a, b in zip(change, change[1:]))
    assert change[0] > 0.03 and change[0] > change[2] > change[4] >= -0.003
    kl = [r["kl"] for r in rows]
    assert all(a > b for a, b in zip(kl, kl[1:]))
    dm = [r["dropped_mass"] for r in rows]
    assert all(a > b for a, b in zip(dm, dm[1:])) and dm[-1] == 0.0


def test_pydocs_tuning_with_a_quality_cap_stays_within_it_when_run_for_real(pydocs_prompts, tmp_path):
    """ef-tune with --max-quality-loss on real weights; the exported config.yaml, loaded and run
    on the real runtime (perplexity measured here, independently of the tuner), is within it."""
    import _tuner_fixtures as fx
    import torch

    from expertflow.budget import plan_memory
    from expertflow.config import load_config
    from expertflow.runtime.loading import build_model
    from expertflow.runtime.offload import offload
    from tuner.pipeline import tune
    from tuner.request import Inputs, QualityOptions, StudyOptions, Target, TuneRequest

    spec, prompts = pydocs_prompts
    cap = 0.02
    prof_dir = fx.recorded_profile(spec.checkpoint, n_prompts=12).save(tmp_path / "profile")
    big = plan_memory(spec, "1GB")
    fixed = big.non_expert_bytes + big.kv_cache_bytes + big.workspace_bytes
    budget = str(int((fixed + 96.5 * big.bytes_per_expert) / (1 - big.margin_fraction)))
    # No threshold 1.0 in this space: the choice must use adaptive-k, and some thresholds
    # (0.7, 0.75 on pydocs) are over the cap.
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"version": 1, "params": {
        "adaptive_k.threshold": {"type": "float", "low": 0.7, "high": 0.95, "step": 0.05},
        "cache.capacity_experts": {"type": "int", "low": "layers", "high": "budget"},
        "cache.policy": {"type": "categorical", "choices": ["lru", "lfu"]}}}))
    res = tune(TuneRequest(Target(str(spec.checkpoint), budget),
                           Inputs(out=tmp_path / "out", profile=prof_dir, search_space=space),
                           StudyOptions(trials=10, jobs=1, seed=1),
                           QualityOptions(max_loss=cap, prompts=PYDOCS_PROMPTS), validate=False, progress=False))
    t = res.tuning
    assert t.quality.metric == "perplexity_increase" and t.quality.cap == cap
    assert {r["threshold"] for r in t.quality.table} >= set(quality.THRESHOLDS)
    config = load_config(res.config_path)
    assert config.provenance.routing == "real"
    assert config.provenance.measured["quality_loss"] <= cap  # the tuner's own real measurement

    # independently: perplexity of the exported config vs full top-k, on the same prompts
    ids = torch.tensor(prompts)
    model = build_model(spec, device="cpu", dtype="float32")

    def ppl(cfg=None) -> float:
        with torch.no_grad():
            if cfg is None:
                logits = model(input_ids=ids, use_cache=False).logits
            else:
                with offload(model, cfg, device="cpu"):
                    logits = model(input_ids=ids, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        return float(torch.exp(-logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()))

    run_cfg = config.with_values({"runtime.device": "cpu", "runtime.dtype": "float32"})
    change = ppl(run_cfg) / ppl() - 1.0
    print(f"\nchosen trial {t.chosen.trial}: threshold {config.adaptive_k.threshold}, "
          f"min_k {config.adaptive_k.min_k}; perplexity change {change:+.4f} (cap {cap}); "
          f"predicted {t.chosen.predicted['decode_tokens_per_s']:.2f} tokens/s")
    assert config.adaptive_k.threshold < 1.0
    assert change <= cap
    over = [r["threshold"] for r in t.quality.table if r["perplexity_change"] > cap]
    assert over and config.adaptive_k.threshold > max(over)  # the cap really bound the choice
