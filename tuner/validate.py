"""Validate predicted configs on the real runtime: measured beside predicted numbers.

Each config runs on the executor it names (`runtime.engine`; auto = the graph engine on CUDA,
measured by `measure_on_engine` on a fresh engine with its graphs captured before the clock
starts, routing replayed inside the captured step by `expertflow.engine.EngineReplay`), or on
the eager runtime (`measure_one`, routing replayed by `TraceReplay` below).

`validate_configs(spec, configs, trace, device=...)` builds the model offloaded per config
(`expertflow.runtime.loading.load_model`), decodes greedily (`greedy_generate`) and measures
decode tokens/s, hit rate, stall ms/token, bytes/token, activated experts/token, prefetch
precision and peak GPU memory. On a machine without a GPU it returns entries with
`measured: None` and a note, unless `force=True` (tests run tiny models on the CPU).

Routing replay (random-weight models): the router of a random model routes nothing like the
real one, so the measured run replays the trace instead. `TraceReplay` registers, on this model
instance only (no code of the runtime changes):
* a forward hook on every MoE router that returns the trace's (weights, ids) rows of the
  current step in place of the router's own (the logits are left as they are);
* the handle's `prediction_source` seam, which hands the scheduler the trace's recorded
  predictions instead of the ones the random gates produce (the predictor's matmul still runs,
  so its cost is measured);
* a forward pre-hook on the model that advances the step: per trace sequence one prefill of its
  first `prompt_tokens` tokens, then one decode step per position, which is exactly the
  simulator's `decode_schedule`, so the scheduler's decisions (hits, misses, prefetches) are the
  simulated ones and only the times differ.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from expertflow.config import resolved_engine
from expertflow.registry import resolve_model

from .numeric import relative_error
from .schedule import sequences
from .simulator import simulate

log = logging.getLogger(__name__)

COMPARED = ("decode_tokens_per_s", "prefill_ms", "stall_ms_per_token", "hit_rate", "bytes_per_token",
            "activated_per_token", "prefetch_precision", "peak_gpu_bytes")


def relative_errors(predicted: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """`tuner.numeric.relative_error` per compared metric, where it is defined."""
    out = {}
    for k in COMPARED:
        err = relative_error(predicted.get(k), measured.get(k))
        if err is not None:
            out[k] = err
    return out


def replay_schedule(trace, prompt_tokens: int, max_decode_tokens: int | None) -> list[tuple[np.ndarray, int]]:
    """Per sequence: (trace token rows [n] in position order, prefill length): the simulator's
    own schedule (tuner.simulator.sequences), cut after `max_decode_tokens` decode tokens."""
    return sequences(trace, prompt_tokens, max_decode_tokens)


class TraceReplay:
    """Make an attached model route (and predict) as the trace says; see the module docstring.

    The replayed rows of a sequence go to the device once, laid out [L, n, k], so that each
    router call returns contiguous views: no host->device copy and no kernel per step or layer.
    """

    def __init__(self, model, handle, trace):
        self.handle, self.trace = handle, trace
        self.blocks = handle.blocks  # the attached handle found them (its experts left the tree)
        self.wdtype = self.blocks[0].router.weight.dtype
        self.rows: np.ndarray | None = None  # trace rows of the current step
        self._seq_rows: np.ndarray | None = None
        self._ids = self._w = None  # [L, n, k] of the current sequence, on the device
        self._step = slice(0, 0)
        self._prefill = 0
        self._calls = 0
        self.on_decode_start = None  # called before the first decode step of each sequence
        self._hooks = [model.register_forward_pre_hook(self._pre_forward)]
        for b in self.blocks:
            self._hooks.append(b.router.register_forward_hook(self._router_hook(b.moe_index)))
        handle.prediction_source = self._predict  # the handle's seam for its predictions

    def start_sequence(self, rows: np.ndarray, prefill: int) -> None:
        import torch

        dev = self.handle.device
        self._seq_rows, self._prefill, self._calls = rows, prefill, 0
        self._ids = torch.as_tensor(np.ascontiguousarray(self.trace.ids[rows].transpose(1, 0, 2)), device=dev)
        self._w = torch.as_tensor(np.ascontiguousarray(self.trace.weights[rows].transpose(1, 0, 2)),
                                  device=dev).to(self.wdtype)

    def _pre_forward(self, module, args):
        i = self._calls
        if i == 1 and self.on_decode_start is not None:
            self.on_decode_start()
        self._step = slice(0, self._prefill) if i == 0 else slice(self._prefill + i - 1, self._prefill + i)
        self.rows = self._seq_rows[self._step]
        self._calls += 1

    def _router_hook(self, m: int):
        def hook(module, inputs, output):
            logits = output[0]
            ids = self._ids[m, self._step]  # [T, k], a view
            if ids.shape[0] != logits.shape[0]:
                raise RuntimeError(f"trace replay: step has {logits.shape[0]} tokens but the trace step "
                                   f"{ids.shape[0]}; replay needs batch 1 and the trace's prompt length")
            return logits, self._w[m, self._step], ids
        return hook

    def _predict(self, layer: int, predictions):
        depth = int(np.asarray(predictions).shape[0])
        if depth == 0 or self.trace.lookahead == 0:
            return predictions
        d = min(depth, self.trace.lookahead)
        return self.trace.pred[self.rows, layer, :d].transpose(1, 0, 2)  # [D, T, k]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.handle.prediction_source = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _decode_delta(before: dict, after: dict) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}


def measure_one(model, handle, spec, trace, *, device, replay: bool, prompt_tokens: int,
                max_decode_tokens: int | None, prompt_ids=None) -> dict[str, float]:
    """Run the decode workload on an attached model; the measured metrics."""
    import torch

    from expertflow.runtime.generate import greedy_generate  # noqa: PLC0415 - torch, only when it runs

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    handle.reset_stats()

    def snapshot():
        st = handle.stats["total"]
        return {k: v for k, v in st.items() if isinstance(v, (int, float))}

    decode_s = prefill_s = 0.0
    decode_tokens = prefills = 0
    zero = snapshot()
    dec = dict.fromkeys(zero, 0.0)
    if replay:
        plan = replay_schedule(trace, prompt_tokens, max_decode_tokens)
        rp = TraceReplay(model, handle, trace)
        try:
            for rows, p in plan:
                rp.start_sequence(rows, p)
                ids = torch.zeros((1, p), dtype=torch.long)  # content is irrelevant: routing is replayed
                first: dict = {}
                rp.on_decode_start = lambda first=first: first.setdefault("s", snapshot())
                # the prefill yields the first new token; then one decode step per position
                res = greedy_generate(model, ids, len(rows) - p + 1)
                end = snapshot()
                for k, v in _decode_delta(first.get("s", end), end).items():
                    dec[k] = dec.get(k, 0.0) + v
                decode_s += res.decode_s
                prefill_s += res.prefill_s
                decode_tokens += max(res.new_tokens - 1, 0)
                prefills += 1
        finally:
            rp.close()
    else:
        if prompt_ids is None:
            g = torch.Generator().manual_seed(0)
            prompt_ids = torch.randint(0, spec.vocab_size, (1, prompt_tokens), generator=g)
        new = (max_decode_tokens or 64) + 1
        first: dict = {}
        calls = {"n": 0}

        def pre(mod, args):
            if calls["n"] == 1:
                first["s"] = snapshot()
            calls["n"] += 1

        hook = model.register_forward_pre_hook(pre)
        try:
            res = greedy_generate(model, prompt_ids, new)
        finally:
            hook.remove()
        end = snapshot()
        dec = _decode_delta(first.get("s", end), end)
        decode_s, prefill_s, decode_tokens, prefills = res.decode_s, res.prefill_s, res.new_tokens - 1, 1
    lookups = dec.get("hits", 0) + dec.get("misses", 0)
    n = max(decode_tokens, 1)
    measured = {
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
        "prefill_ms": prefill_s * 1000.0 / max(prefills, 1),
        "stall_ms_per_token": dec.get("stall_ms", 0.0) / n,
        "hit_rate": dec.get("hits", 0) / lookups if lookups else 0.0,
        "bytes_per_token": dec.get("bytes_moved", 0) / n,
        "activated_per_token": dec.get("activated", 0) / n,
        "prefetch_precision": (dec.get("prefetch_used", 0) / dec["prefetch_issued"]
                               if dec.get("prefetch_issued") else 0.0),
        "decode_tokens": float(decode_tokens),
    }
    if cuda:
        measured["peak_gpu_bytes"] = float(torch.cuda.max_memory_allocated(device))
        measured["peak_reserved_bytes"] = float(torch.cuda.max_memory_reserved(device))
    return measured


def measure_on_engine(model, engine, spec, trace, *, device, replay: bool, prompt_tokens: int,
                      max_decode_tokens: int | None, prompt_ids=None) -> dict[str, float]:
    """The decode workload on an attached graph engine (fresh: its decisions start from the warm
    start, as the simulator's do), graphs captured before the clock starts; detaches it."""
    import torch

    from expertflow.engine import replay_generate  # noqa: PLC0415 - torch, only when it runs

    cuda = device.type == "cuda"
    try:
        if replay:
            plan = replay_schedule(trace, prompt_tokens, max_decode_tokens)
            engine.use_replay(max(len(r) for r, _ in plan))
            engine.capture(1, max(len(r) for r, _ in plan) + 1)
        else:
            if prompt_ids is None:
                g = torch.Generator().manual_seed(0)
                prompt_ids = torch.randint(0, spec.vocab_size, (1, prompt_tokens), generator=g)
            new = (max_decode_tokens or 64) + 1
            engine.capture(1, prompt_ids.shape[1] + new)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        engine.reset_stats()
        if replay:
            res = replay_generate(engine, trace, plan)
            decode_s, prefill_s, n, prefills = res["decode_s"], res["prefill_s"], res["decode_tokens"], res["sequences"]
        else:
            out = engine.generate(prompt_ids, new)
            decode_s, prefill_s, n, prefills = out.decode_s, out.prefill_s, out.new_tokens - 1, 1
        dec = dict(engine.sched.decode)
        activated = engine.counters.sums()["activated"]  # every step: the prefill rows too
        measured = _engine_metrics(dec, decode_s, prefill_s, n, prefills, engine.store.expert_bytes)
        measured["activated_all_steps"] = float(activated)
        if cuda:
            measured["peak_gpu_bytes"] = float(torch.cuda.max_memory_allocated(device))
            measured["peak_reserved_bytes"] = float(torch.cuda.max_memory_reserved(device))
        return measured
    finally:
        engine.detach()


def _engine_metrics(dec: dict, decode_s: float, prefill_s: float, n: int, prefills: int, bpe: int) -> dict:
    lookups = dec["hits"] + dec["misses"]
    tokens = max(n, 1)
    return {"decode_tokens_per_s": n / decode_s if decode_s > 0 else 0.0,
            "prefill_ms": prefill_s * 1000.0 / max(prefills, 1),
            "hit_rate": dec["hits"] / lookups if lookups else 1.0,
            "hits": float(dec["hits"]), "misses": float(dec["misses"]),
            "misses_per_token": dec["misses"] / tokens, "bytes_per_token": dec["misses"] * bpe / tokens,
            "admitted_per_token": dec["admitted"] / tokens, "decode_tokens": float(n)}


def validate_configs(spec, configs, trace=None, *, device: str = "cuda", max_new_tokens: int = 128,
                     prompt_tokens: int = 16, labels=None, predicted=None, costs=None,
                     replay: bool | None = None, force: bool = False, seed: int = 0,
                     warmup_tokens: int = 4, prompt_ids=None, trials=None) -> list[dict[str, Any]]:
    """Measure each config on the real runtime; entries follow tuning.json's `validation`:
    {label, trial, params, predicted, measured, error, note}.

    spec: a ModelSpec or name; configs: RuntimeConfigs of that model; trace: the profile's
    routing trace (replayed when `replay`, by default for models without weights);
    max_new_tokens: decode tokens measured per config (over several trace sequences);
    predicted: per config the simulator's metrics; with `costs` instead, they are simulated
    here on exactly the measured schedule. On CPU nothing runs unless `force`.
    """
    from expertflow.runtime.loading import resolve_device  # noqa: PLC0415 - torch, only when it runs

    if isinstance(spec, str):
        spec = resolve_model(spec)
    configs = list(configs)
    labels = list(labels) if labels is not None else [f"config {i}" for i in range(len(configs))]
    trials = list(trials) if trials is not None else [None] * len(configs)
    preds = list(predicted) if predicted is not None else [None] * len(configs)
    replay = (not spec.has_weights) if replay is None else replay
    if replay and trace is None:
        raise ValueError("routing replay needs the profile's trace")
    try:
        dev = resolve_device(device)
    except Exception as exc:  # noqa: BLE001 - DeviceError or a CUDA init error: say so in every entry
        dev, note = None, f"not validated: {exc}"
    else:
        note = None if (dev.type == "cuda" or force) else "no GPU here: predictions not validated"
    out = []
    cache: dict = {}  # the model, built once and re-attached per config
    for cfg, label, trial, pred in zip(configs, labels, trials, preds):
        entry: dict[str, Any] = {"label": label, "trial": trial, "params": None, "predicted": pred,
                                 "measured": None, "error": None}
        if note is not None:
            entry["note"] = note
            out.append(entry)
            continue
        t0 = time.perf_counter()
        measured = _measure_config(spec, cfg, trace, dev, replay=replay, prompt_tokens=prompt_tokens,
                                   max_decode_tokens=max_new_tokens, seed=seed,
                                   warmup_tokens=warmup_tokens, prompt_ids=prompt_ids, cache=cache)
        if pred is None and costs is not None and trace is not None:

            sim_trace = _as_replayed(trace, cache.get("model")) if replay else trace
            pred = simulate(sim_trace, costs, cfg, prompt_tokens=prompt_tokens,
                            max_decode_tokens=int(measured["decode_tokens"])).metrics
        entry.update(predicted=pred, measured=measured,
                     error=relative_errors(pred, measured) if pred else None,
                     note=f"measured on {_device_name(dev)} in {time.perf_counter() - t0:.1f} s"
                          + (" (trace routing replayed)" if replay else ""))
        out.append(entry)
    cache.clear()
    return out


def _as_replayed(trace, model):
    """`trace` with its gate weights rounded to the router's dtype, as the replay hands them
    to the runtime (bf16 rounding can flip an adaptive-k decision at the threshold)."""
    import dataclasses

    import torch

    if model is None:
        return trace
    dtype = next((p.dtype for n, p in model.named_parameters() if n.endswith("gate.weight")), torch.float32)
    w = torch.from_numpy(trace.weights).to(dtype).to(torch.float32).numpy()
    return dataclasses.replace(trace, weights=w)


def _device_name(dev) -> str:
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    return "cpu"


def _measure_config(spec, cfg, trace, dev, *, replay, prompt_tokens, max_decode_tokens, seed,
                    warmup_tokens, prompt_ids, cache: dict) -> dict[str, float]:
    """Attach `cfg` to the model (built once per validate_configs call, experts on the host;
    later configs re-attach to it) on the executor it names (graph engine on CUDA by default,
    or the eager runtime), warm up, measure, detach."""
    import torch

    from expertflow.runtime.generate import greedy_generate  # noqa: PLC0415 - torch, only when it runs
    from expertflow.runtime.loading import attach_executor, load_model  # noqa: PLC0415 - torch, only when it runs
    from expertflow.runtime.offload import offload  # noqa: PLC0415 - torch, only when it runs

    on_engine = resolved_engine(cfg, dev.type) == "graph"
    if "model" not in cache:
        cache["model"], handle = load_model(str(spec.checkpoint or spec.name), cfg, device=str(dev), seed=seed)
    else:
        handle = attach_executor(cache["model"], cfg, dev)
    model = cache["model"]
    if on_engine:
        return measure_on_engine(model, handle, spec, trace, device=dev, replay=replay,
                                 prompt_tokens=prompt_tokens, max_decode_tokens=max_decode_tokens,
                                 prompt_ids=prompt_ids)
    try:
        if warmup_tokens > 0:  # kernels, allocator and cuBLAS warm; then a fresh handle
            ids = torch.zeros((1, prompt_tokens), dtype=torch.long)
            greedy_generate(model, ids, warmup_tokens)
            handle.detach()
            handle = offload(model, cfg, device=str(dev))
        return measure_one(model, handle, spec, trace, device=dev, replay=replay,
                           prompt_tokens=prompt_tokens, max_decode_tokens=max_decode_tokens,
                           prompt_ids=prompt_ids)
    finally:
        handle.detach()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
