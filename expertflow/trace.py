"""Routing traces: what the router chose, per step, MoE layer and token, plus the predictor's
guesses for the next layers. Recorded by the runtime (real routing) or made by the synthetic
generator; read by the profiler's statistics and replayed by the simulator.

File format (`.npz`, numpy, compressed), version 1:
    meta      JSON string: version, model fingerprint, num_layers (MoE), num_experts, top_k,
              lookahead (D), routing ("real" | "synthetic"), source (free text)
    ids       int16   [N, L, k]     router top-k expert ids, in the router's order
    weights   float32 [N, L, k]     their gate weights (as the router returned them)
    pred      int16   [N, L, D, k]  pred[t, l, d-1] = top-k of layer l+d's gate applied to the
                                    hidden state entering layer l's MoE block; -1 past the last layer
    seq, pos  int32   [N]           sequence id and position of each token
    steps     int64   [S, 3]        (first token, token count, kind: 0 prefill / 1 decode): the
                                    forward passes in order; tokens of one step are contiguous
N tokens, L MoE layers, k = top-k, D lookahead distances.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .fsutil import atomic_path, check_version

TRACE_VERSION = 1
PREFILL, DECODE = 0, 1


@dataclass
class RoutingTrace:
    ids: np.ndarray
    weights: np.ndarray
    pred: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    steps: np.ndarray
    meta: dict = field(default_factory=dict)

    # ---- shape ------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def lookahead(self) -> int:
        return int(self.pred.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def routing(self) -> str:
        return str(self.meta.get("routing", "real"))

    def step_slices(self):
        """Yield (slice of tokens, kind) per forward step, in order."""
        for first, count, kind in self.steps.tolist():
            yield slice(first, first + count), kind

    def validate(self, source: str = "trace") -> RoutingTrace:
        n, L, k = self.ids.shape if self.ids.ndim == 3 else (None, None, None)
        problems = []
        if n is None:
            problems.append(f"ids has shape {self.ids.shape}, expected [N, L, k]")
        else:
            if self.weights.shape != (n, L, k):
                problems.append(f"weights shape {self.weights.shape} != ids shape {(n, L, k)}")
            if self.pred.ndim != 4 or self.pred.shape[:2] != (n, L) or self.pred.shape[3] != k:
                problems.append(f"pred shape {self.pred.shape}, expected [{n}, {L}, D, {k}]")
            if self.seq.shape != (n,) or self.pos.shape != (n,):
                problems.append("seq/pos must have one entry per token")
            E = self.meta.get("num_experts")
            if not isinstance(E, int) or E < 1:
                problems.append(f"meta.num_experts is {E!r}")
            elif n and (self.ids.min() < 0 or self.ids.max() >= E):
                problems.append(f"expert ids outside [0, {E})")
            if n and not np.isfinite(self.weights).all():
                problems.append("weights contain NaN or inf")
            if self.steps.ndim != 2 or self.steps.shape[1:] != (3,):
                problems.append(f"steps shape {self.steps.shape}, expected [S, 3]")
            elif self.steps.size and (int(self.steps[:, 1].sum()) != n or self.steps[0, 0] != 0 or
                                      (self.steps[1:, 0] != np.cumsum(self.steps[:, 1])[:-1]).any()):
                problems.append("steps do not tile the tokens in order")
        if problems:
            raise DataError(f"{source} is corrupt: {problems[0]}; re-record it with ef-profile")
        return self

    # ---- io ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        meta = {**self.meta, "version": TRACE_VERSION}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh, meta=np.array(json.dumps(meta, sort_keys=True)),
                    ids=self.ids.astype(np.int16), weights=self.weights.astype(np.float32),
                    pred=self.pred.astype(np.int16), seq=self.seq.astype(np.int32),
                    pos=self.pos.astype(np.int32), steps=self.steps.astype(np.int64))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingTrace:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"trace file {str(p)!r} does not exist; run ef-profile to record one")
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in ("ids", "weights", "pred", "seq", "pos", "steps")}
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, json.JSONDecodeError) as exc:
            raise DataError(f"trace file {str(p)!r} is corrupt or truncated ({exc.__class__.__name__}); "
                            "re-record it with ef-profile") from None
        check_version(meta, version=TRACE_VERSION, source=f"trace file {str(p)!r}",
                      redo="re-record it with ef-profile")
        t = cls(ids=arrays["ids"].astype(np.int64), weights=arrays["weights"].astype(np.float32),
                pred=arrays["pred"].astype(np.int64), seq=arrays["seq"], pos=arrays["pos"],
                steps=arrays["steps"], meta=meta)
        return t.validate(source=f"trace file {str(p)!r}")


class TraceRecorder:
    """Accumulates one step at a time (the runtime calls `add_layer` per MoE layer visit)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, lookahead: int, meta: dict):
        self.L, self.E, self.k, self.D = num_layers, num_experts, top_k, lookahead
        self.meta = {**meta, "num_layers": num_layers, "num_experts": num_experts, "top_k": top_k,
                     "lookahead": lookahead}
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._steps: list[tuple[int, int, int]] = []
        self._cur: dict | None = None
        self._n = 0

    def begin_step(self, seq: np.ndarray, pos: np.ndarray, kind: int) -> None:
        t = len(seq)
        self._cur = {"ids": np.zeros((t, self.L, self.k), np.int16),
                     "w": np.zeros((t, self.L, self.k), np.float32),
                     "pred": np.full((t, self.L, self.D, self.k), -1, np.int16),
                     "seq": np.asarray(seq, np.int32), "pos": np.asarray(pos, np.int32), "kind": kind}

    def add_layer(self, layer: int, ids: np.ndarray, weights: np.ndarray,
                  pred: np.ndarray | None) -> None:
        cur = self._cur
        if cur is None:
            return
        cur["ids"][:, layer] = ids
        cur["w"][:, layer] = weights
        if pred is not None and self.D:
            d = min(self.D, pred.shape[0])
            cur["pred"][:, layer, :d, :] = np.moveaxis(pred[:d, :, :self.k], 0, 1)

    def end_step(self) -> None:
        cur = self._cur
        if cur is None:
            return
        t = len(cur["seq"])
        self._chunks.append((cur["ids"], cur["w"], cur["pred"], cur["seq"], cur["pos"]))
        self._steps.append((self._n, t, cur["kind"]))
        self._n += t
        self._cur = None

    def trace(self) -> RoutingTrace:
        if not self._chunks:
            z = np.zeros((0, self.L, self.k))
            return RoutingTrace(z.astype(np.int64), z.astype(np.float32),
                                np.zeros((0, self.L, self.D, self.k), np.int64),
                                np.zeros(0, np.int32), np.zeros(0, np.int32),
                                np.zeros((0, 3), np.int64), dict(self.meta))
        cat = [np.concatenate(parts) for parts in zip(*self._chunks)]
        return RoutingTrace(cat[0].astype(np.int64), cat[1], cat[2].astype(np.int64), cat[3], cat[4],
                            np.asarray(self._steps, dtype=np.int64), dict(self.meta))
