"""H200-like profile timing tables for tests that need a Profile without running the profiler
(tests/tuner/_tuner_fixtures.py, tests/reports/conftest.py). Costs follow ../shared/anchors.md:
pinned host->device ~52-55 GB/s, eager expert kernel ~0.10-0.16 ms."""

from __future__ import annotations

import pandas as pd

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def timing_tables(*, pinned_gbps: float = 55.0, pageable_gbps: float = 15.0, min_pow: int = 10,
                  max_pow: int = 30, decode_layer_ms: float = 1.2) -> dict[str, pd.DataFrame]:
    """transfer (sizes 2**min_pow..2**max_pow, step x4), kernel, layer and runtime tables."""
    transfer = []
    for pinned, gbps, lat in ((True, pinned_gbps, 0.008), (False, pageable_gbps, 0.02)):
        for b in (2**p for p in range(min_pow, max_pow + 1, 2)):
            ms = lat + b / (gbps * 1e6)
            transfer.append({"bytes": b, "pinned": pinned, "concurrency": 1, "median_ms": ms,
                             "p10_ms": ms * 0.95, "p90_ms": ms * 1.1, "gbps": b / ms / 1e6})
    kernel = pd.DataFrame({"tokens": TOKENS, "median_ms": [0.10 + 2e-4 * t for t in TOKENS],
                           "p10_ms": [0.09 + 2e-4 * t for t in TOKENS],
                           "p90_ms": [0.12 + 2e-4 * t for t in TOKENS]})
    layer = pd.DataFrame({"tokens": TOKENS, "median_ms": [0.05 + 1e-3 * t for t in TOKENS],
                          "p10_ms": [0.045 + 1e-3 * t for t in TOKENS],
                          "p90_ms": [0.06 + 1e-3 * t for t in TOKENS]})
    runtime = pd.DataFrame({"name": ["decode_layer_ms", "sync_ms", "host_pre_fraction"],
                            "value": [decode_layer_ms, 0.02, 0.6]})
    return {"transfer": pd.DataFrame(transfer), "kernel": kernel, "layer": layer, "runtime": runtime}
