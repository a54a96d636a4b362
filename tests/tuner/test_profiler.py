"""ef-profile end to end on the CPU: tiny models with both routing kinds, the trained pydocs-moe
checkpoint against its README, the profile/trace round trip, prompt-file and device errors,
bundled hardware, and (on the GPU machine only) the H200 acceptance run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expertflow.errors import DataError, DeviceError
from expertflow.registry import resolve_model
from tuner import stats, synthetic
from efcli.profile import main as profile_main
from tuner.profile import OPTIONAL_TABLES, REQUIRED_COLUMNS, Profile
from tuner.profiler import run_profile
from tuner.profiler.activation import load_prompts, tokenize_prompts

# pydocs-moe README: busiest-25% traffic share (held-out text) and LRU hit at 25% capacity
# (its 128 prompts), per layer.
README_SHARE = [0.94, 0.58, 0.55, 0.56, 0.53, 0.50, 0.52, 0.49]
README_LRU25 = [0.93, 0.61, 0.59, 0.62, 0.55, 0.57, 0.54, 0.52]
README_LRU50 = [1.00, 0.89, 0.86, 0.88, 0.82, 0.85, 0.82, 0.79]
README_PRED_D1 = [0.47, 0.76, 0.81, 0.83, 0.83, 0.83, 0.82]  # target layers 1..7


REPO_ROOT = Path(__file__).resolve().parents[2]


def _pydocs_dir() -> Path:
    """The pydocs-moe checkpoint ($EXPERTFLOW_PYDOCS or ../shared/models/pydocs-moe), or skip."""
    env = os.environ.get("EXPERTFLOW_PYDOCS")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "models" / "pydocs-moe"
    if not (path / "config.json").is_file():
        pytest.skip(f"pydocs-moe checkpoint not found at {path} (set $EXPERTFLOW_PYDOCS to its "
                    "directory to run the tests that need learned routing)")
    return path


@pytest.fixture(scope="module")
def pydocs_profile(tmp_path_factory):
    path = _pydocs_dir()
    out = tmp_path_factory.mktemp("pydocs") / "profile"
    # no prompts given: the checkpoint's own prompts.jsonl (the set quality is measured on too)
    run_profile(str(path), out, device="cpu", quick=True, progress=False)
    return Profile.load(out)


def test_pydocs_profile_reproduces_readme_routing(pydocs_profile):
    p = pydocs_profile
    assert p.routing_kind == "real" and p.trace.num_tokens == 128 * 64
    share = stats.traffic_share_top(p.trace, 0.25)
    d = stats.lru_stack_distances(p.trace)
    lru25 = stats.lru_hit_rate(p.trace, 0.25, distances=d)
    lru50 = stats.lru_hit_rate(p.trace, 0.5, distances=d)
    assert share == pytest.approx(README_SHARE, abs=0.05)
    assert lru25 == pytest.approx(README_LRU25, abs=0.05)
    assert lru50 == pytest.approx(README_LRU50, abs=0.05)
    pred = p.tables["predictor"]
    d1 = pred[pred["lookahead"] == 1].sort_values("layer")["recall"].to_numpy()
    assert d1 == pytest.approx(README_PRED_D1, abs=0.05)
    assert p.meta.routing.stats["lru_hit_25"] == pytest.approx(README_LRU25, abs=0.05)
    assert "trained router" in p.meta.routing.note
    assert p.meta.routing.tokenizer == "tokenizer.json"


def test_without_prompts_trace_and_quality_use_the_checkpoint_prompts(pydocs_profile):
    """One prompt set: the trace was recorded on the checkpoint's prompts.jsonl (128 prompts of
    64 tokens; the embedded set is 40 prompts of other lengths) and the quality side reads the
    same prompts, in the same order."""
    from tuner import quality

    p = pydocs_profile
    spec = resolve_model(p.meta.model.name)
    own = Path(spec.checkpoint) / "prompts.jsonl"
    assert str(own) in p.meta.routing.source and "checkpoint's own prompts" in p.meta.routing.source
    expected = [len(t) for t in tokenize_prompts(spec, load_prompts(own))]
    assert np.bincount(p.trace.seq).tolist() == expected
    ids = quality.prompt_ids(spec, max_tokens=10**6, min_tokens=1)
    assert [len(x) for x in ids] == expected
    embedded = [len(t) for t in tokenize_prompts(spec, load_prompts(None))]
    assert embedded != expected  # the check above can tell the two sets apart


def test_profile_and_trace_round_trip(pydocs_profile, tmp_path):
    p = pydocs_profile
    again = Profile.load(p.save(tmp_path / "copy"))
    for name in ("ids", "weights", "pred", "seq", "pos", "steps"):
        assert np.array_equal(getattr(again.trace, name), getattr(p.trace, name)), name
    assert again.trace.meta == p.trace.meta
    for name, df in p.tables.items():
        pd.testing.assert_frame_equal(again.tables[name], df, check_dtype=False)
    assert again.meta.routing == p.meta.routing
    assert again.copy_ms(p.meta.model.bytes_per_expert) > 0


def test_synthetic_fit_to_pydocs_reproduces_its_skew_and_locality(pydocs_profile):
    real = pydocs_profile.trace
    params = synthetic.fit_to_trace(real)
    fake = synthetic.generate(params, [64] * 128, seed=1)
    assert stats.traffic_share_top(fake) == pytest.approx(stats.traffic_share_top(real), abs=0.05)
    assert stats.lru_hit_rate(fake) == pytest.approx(stats.lru_hit_rate(real), abs=0.05)
    rec_real = np.nanmean(stats.predictor_recall(real), axis=1)
    rec_fake = np.nanmean(stats.predictor_recall(fake), axis=1)
    assert rec_fake == pytest.approx(rec_real, abs=0.05)


@pytest.mark.parametrize("name,routing", [("tiny-qwen2-moe", "synthetic"), ("tiny-mixtral", "real"),
                                          ("tiny-qwen3-moe", "synthetic"), ("tiny-olmoe", "real"),
                                          ("tiny-deepseek-v2", "synthetic")])
def test_tiny_models_end_to_end(name, routing, tmp_path):
    spec = resolve_model(name)
    prof = run_profile(name, tmp_path / "p", device="cpu", routing=routing, max_tokens=400,
                       quick=True, progress=False)
    back = Profile.load(tmp_path / "p")
    assert back.routing_kind == routing and back.fingerprint == spec.fingerprint
    assert back.trace.num_tokens == 400 and back.trace.num_layers == spec.num_moe_layers
    for table, cols in REQUIRED_COLUMNS.items():
        if table in OPTIONAL_TABLES:  # the graph engine's: measured on a GPU only
            assert table not in back.tables, table
            continue
        assert set(cols) <= set(back.tables[table].columns), table
        assert len(back.tables[table]), table
    assert back.priors().sum(1) == pytest.approx(np.ones(spec.num_moe_layers))
    assert back.meta.timing.kind == "measured-cpu"
    assert "CPU" in back.meta.timing.note
    assert back.meta.hardware["device"] == "cpu" and back.meta.hardware["source"] == "measured"
    rt = dict(zip(back.tables["runtime"]["name"], back.tables["runtime"]["value"]))
    assert rt["decode_layer_ms"] > 0 and rt["sync_ms"] > 0 and "pinned_1gib_gbps" in rt
    assert set(back.tables["kernel"]["tokens"]) >= {1, 1024}
    note = back.meta.routing.note
    if routing == "synthetic":
        assert note.startswith("SYNTHETIC routing") and back.meta.routing.synthetic["preset"]
    else:
        assert "RANDOM weights" in note and back.meta.routing.synthetic is None
    assert prof.profile_id == back.profile_id


def test_cli_json_summary(tmp_path, capsys):
    rc = profile_main(["--model", "tiny-qwen2-moe", "--out", str(tmp_path / "p"), "--device", "cpu",
                       "--quick", "--max-tokens", "200", "--routing", "real", "--json"])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    summary = json.loads(lines[-1])
    assert Path(summary["profile_dir"]) == (tmp_path / "p").resolve()
    assert summary["routing"] == "real" and summary["timing"] == "measured-cpu"
    assert summary["tokens"] == 200
    for key in ("pinned_gbps", "pinned_1gib_gbps", "expert_copy_ms", "expert_kernel_ms", "layer_ms",
                "decode_layer_ms", "top25_traffic_share_mean", "lru_hit_25_mean"):
        assert key in summary["summary"], key
    back = Profile.load(summary["profile_dir"])
    assert back.profile_id == summary["profile_id"]
    noise = back.meta.timing.noise  # a CPU profile records its noise verdict, round-tripped
    assert summary["timing_noisy"] is noise.noisy and "relative IQR" in noise.criterion
    assert {"rel_iqr", "raw_median_ms"} <= set(back.tables["kernel"].columns)


@pytest.mark.parametrize("content,needle", [("", "holds no prompts"), ("\n  \n", "holds no prompts"),
                                            ('{"prompt": "ok"}\n{"prompt": oops}\n', "line 2"),
                                            ('{"text": "no prompt field"}\n', "'prompt' field")])
def test_bad_prompt_files_exit_with_the_data_code(tmp_path, capsys, content, needle):
    f = tmp_path / "prompts.jsonl"
    f.write_text(content)
    rc = profile_main(["--model", "tiny-qwen2-moe", "--out", str(tmp_path / "p"), "--device", "cpu",
                       "--prompts", str(f)])
    assert rc == DataError.exit_code == 6
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_missing_prompt_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run_profile("tiny-qwen2-moe", tmp_path / "p", prompts=tmp_path / "nope.txt", device="cpu")


def test_text_prompt_files_split_on_blank_lines(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\nstill first\n\n\nsecond prompt\n\n")
    assert load_prompts(f) == ["first prompt\nstill first", "second prompt"]
    default = load_prompts()
    assert len(default) >= 30 and all(len(p) > 40 for p in default)
    ids = tokenize_prompts(resolve_model("tiny-mixtral"), ["héllo"], None)
    assert ids == [[b % 256 for b in "héllo".encode()]]
    capped = tokenize_prompts(resolve_model("qwen2-moe"), default, max_tokens=100)
    assert sum(map(len, capped)) == 100


def test_device_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    with pytest.raises(DeviceError):
        run_profile("tiny-qwen2-moe", tmp_path / "p", device="cuda")
    rc = profile_main(["--model", "tiny-qwen2-moe", "--out", str(tmp_path / "p"), "--device", "cuda"])
    assert rc == DeviceError.exit_code == 7
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bundled_hardware(tmp_path, monkeypatch):
    from tuner.profiler.bundled import ROOT_ENV, bundled_hardware_names, load_bundled, save_bundled
    from tuner.profiler.timing import timing_summary

    root = tmp_path / "hw"
    monkeypatch.setenv(ROOT_ENV, str(root))
    with pytest.raises(DataError, match="bench/bundle_hardware.py"):
        run_profile("tiny-qwen2-moe", tmp_path / "p0", device="cpu", hardware="h200", progress=False)
    # a bundle made from a CPU measurement stands in for the GPU tables here
    spec = resolve_model("tiny-qwen2-moe")
    src = run_profile(spec, None, device="cpu", quick=True, max_tokens=100, progress=False)
    tables = {t: src.tables[t] for t in ("transfer", "kernel", "layer", "runtime")}
    hw = {**src.meta.hardware, "gpu_name": "Test GPU"}
    save_bundled("testgpu", "tiny-qwen2-moe", fingerprint=spec.fingerprint, dtype="float32",
                 bytes_per_expert=spec.bytes_per_expert("float32"), hardware=hw,
                 timing={"kind": "measured-cpu", "note": "test"},
                 summary=timing_summary(tables, spec.bytes_per_expert("float32")), tables=tables)
    assert bundled_hardware_names() == ["testgpu"]
    prof = run_profile("tiny-qwen2-moe", tmp_path / "p1", device="cpu", hardware="testgpu",
                       max_tokens=100, progress=False)
    assert prof.meta.hardware["source"] == "bundled:testgpu"
    assert prof.meta.timing.kind == "bundled:testgpu" and "Test GPU" in prof.meta.timing.note
    for t, df in tables.items():
        pd.testing.assert_frame_equal(prof.tables[t].reset_index(drop=True), df.reset_index(drop=True))
    # a checkpoint with the alias's dims uses the alias's tables
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", **spec.config}))
    hw2, tables2 = load_bundled("testgpu", resolve_model(str(ckpt)))
    assert hw2["bundle_model"] == "tiny-qwen2-moe"
    pd.testing.assert_frame_equal(tables2["kernel"], tables["kernel"])
    with pytest.raises(DataError, match="no timing for 'tiny-mixtral'"):
        load_bundled("testgpu", resolve_model("tiny-mixtral"))
    with pytest.raises(DataError, match="no bundled hardware profile 'a100'"):
        load_bundled("a100", spec)
    save_bundled("testgpu", "tiny-olmoe", fingerprint="dims-0000000000000000", dtype="float32",
                 bytes_per_expert=1, hardware=hw, timing={}, summary={}, tables=tables)
    with pytest.raises(DataError, match="made for dims"):
        load_bundled("testgpu", resolve_model("tiny-olmoe"))


@pytest.mark.gpu
def test_h200_full_profile_of_qwen2_moe(tmp_path):
    """On the GPU machine: a full profile of qwen2-moe (random weights) in under 2 minutes, and
    its pinned host->device bandwidth within 5% of a 1 GiB pinned copy of the same run."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    t0 = time.perf_counter()
    prof = run_profile("qwen2-moe", tmp_path / "p", device="cuda", progress=False)
    elapsed = time.perf_counter() - t0
    s = prof.meta.summary
    assert prof.meta.timing.kind == "measured-gpu" and prof.meta.hardware["gpu_name"]
    assert prof.routing_kind == "synthetic"
    assert abs(s["pinned_gbps"] / s["pinned_1gib_gbps"] - 1) < 0.05, s
    assert elapsed < 120, elapsed
    Profile.load(tmp_path / "p")


def test_hardware_facts_without_a_gpu():
    import torch

    from tuner.profiler.hardware import HARDWARE_KEYS, collect_hardware, nvml_info

    info = collect_hardware("cpu")
    assert set(HARDWARE_KEYS) <= set(info)
    assert info["device"] == "cpu" and info["gpu_name"] is None and info["source"] == "measured"
    assert info["host_memory_bytes"] > 0 and info["torch_version"] == str(torch.__version__)
    if not torch.cuda.is_available():
        assert "nvml_error" in nvml_info()  # no driver here: a reason, not an exception


def test_default_prompt_file_is_the_checkpoints_own(tmp_path):
    from types import SimpleNamespace

    from tuner.profiler.activation import default_prompt_file, prompt_source

    bare = SimpleNamespace(checkpoint=str(tmp_path))
    assert default_prompt_file(bare) is None and prompt_source(bare, None) == "embedded default prompt set"
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    assert default_prompt_file(bare) == tmp_path / "prompts.jsonl"
    assert prompt_source(bare, "mine.txt") == "mine.txt"
    assert default_prompt_file(SimpleNamespace(checkpoint=None)) is None
