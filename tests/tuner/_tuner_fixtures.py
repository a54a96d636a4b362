"""Helpers shared by the tuner's tests (test_study, test_pipeline): a small Profile built without
the profiler, from the synthetic generator's uncalibrated knobs and H200-like timing tables."""

from __future__ import annotations

import _timing
import numpy as np
import pandas as pd

# H200-like costs (../shared/anchors.md): pinned 55 GB/s, eager expert kernel ~0.10-0.16 ms.
PINNED_GBPS, PAGEABLE_GBPS = 55.0, 15.0


def timing_tables(decode_layer_ms: float = 1.2) -> dict[str, pd.DataFrame]:
    return _timing.timing_tables(pinned_gbps=PINNED_GBPS, pageable_gbps=PAGEABLE_GBPS,
                                 decode_layer_ms=decode_layer_ms)


def synthetic_trace(spec, *, seqs: int = 6, seq_len: int = 48, seed: int = 0, skew: float = 1.5,
                    locality: float = 0.6):
    from tuner.synthetic import SyntheticParams, generate

    L = spec.num_moe_layers
    p = SyntheticParams(spec.num_moe_layers, spec.num_experts, spec.top_k, skew=(skew,) * L,
                        locality=(locality,) * L, normalize_topk=spec.norm_topk_prob, preset="test")
    return generate(p, [seq_len] * seqs, seed=seed, meta={"fingerprint": spec.fingerprint})


def make_profile(name: str = "tiny-qwen2-moe", *, routing: str = "synthetic", trace=None, **kw):
    """A complete tuner.profile.Profile for `name` (an alias or checkpoint path)."""
    from expertflow.registry import resolve_model
    from tuner.profile import Profile
    from tuner.records import ProfileMeta, ProfileModel, ProfileRouting, ProfileTiming
    from tuner.stats import routing_tables

    spec = resolve_model(name)
    trace = trace if trace is not None else synthetic_trace(spec, **kw)
    tables = {**routing_tables(trace), **timing_tables()}
    meta = ProfileMeta(
        profile_id=f"{spec.name.rsplit('/', 1)[-1]}-test-20261129T000000Z",
        created_at="2026-11-29T00:00:00Z", tool_version="0.1.0",
        model=ProfileModel(name=spec.name, architecture=spec.architecture, fingerprint=spec.fingerprint,
                           dims=spec.dims(), dtype="bfloat16", bytes_per_expert=spec.bytes_per_expert()),
        hardware={"device": "cpu", "gpu_name": "NVIDIA H200", "gpu_memory_bytes": 150_754_820_096,
                  "pcie_generation": 5, "pcie_width": 16, "source": "bundled:h200"},
        routing=ProfileRouting(kind=routing, tokens=trace.num_tokens, prompts=len(np.unique(trace.seq)),
                               source="test", note="SYNTHETIC routing (test fixture)" if routing == "synthetic"
                               else "real routing"),
        timing=ProfileTiming(kind="bundled:h200", note="test tables"),
        summary={"pinned_gbps": PINNED_GBPS})
    return Profile(meta=meta, trace=trace, tables=tables)


def recorded_profile(path, *, n_prompts: int = 16):
    """A Profile of a checkpoint with weights: its real routing recorded by the profiler's
    `record_routing` on its first `n_prompts` prompts, and the test timing tables."""
    from expertflow.registry import resolve_model
    from tuner import quality
    from tuner.profiler.activation import record_routing

    spec = resolve_model(path)
    ids = quality.prompt_ids(spec, n_prompts=n_prompts)
    trace = record_routing(spec, ids, device="cpu", dtype="float32")
    return make_profile(path, routing="real", trace=trace)
