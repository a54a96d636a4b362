"""Attach the built-in scheduler to a transformers MoE model (and detach it again).

How it hooks in, per model instance (no process-wide patching):
* an experts backend named "expertflow" is registered in transformers' `ExpertsInterface`
  (a registry made for this) and selected with `model.set_experts_implementation`, so every
  fused `*Experts` module of *this* model calls `_experts_forward` with the router's
  (hidden_states, top_k_index, top_k_weights); other models keep their own backend;
* each experts module is tagged with its MoE-layer index; its `gate_up_proj`/`down_proj` leave
  the parameter tree for a host store (pinned memory on CUDA) and a GPU slot pool holds the
  cached experts;
* `detach()` puts the parameters back (same values, device, dtype) and restores the backend.

Per MoE layer visit, `_layer_forward`:
 1. applies the next layers' gates to the current hidden state (predictor, on the device);
 2. reads ids, weights and predictions to the host in ONE transfer (the only sync);
 3. asks the torch-free `Scheduler` for the decisions (adaptive-k, hits, loads, evictions);
 4. issues demand loads on the copy stream; the compute stream waits only on the events of the
    slots it needs, then runs transformers' own experts kernel over the slot pool
    (expert ids remapped to slots), wave by wave when a layer needs more experts than it has slots;
 5. issues the planned prefetches on the copy stream, which overlap the next layers' compute.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager
import numpy as np
import torch
from torch import nn

from ..config import RuntimeConfig, load_config
from ..core import Route, Scheduler, SchedulerParams
from ..core.counters import Counters
from ..trace import DECODE, PREFILL, RoutingTrace, TraceRecorder
from .backend import (BACKEND_NAME, PoolKernels, attach_target, experts_implementation, register_backend,
                      restore_experts_implementation)
from .generate import greedy_generate
from .store import HostStore, SlotPool

log = logging.getLogger(__name__)

TRACE_LOOKAHEAD = 4  # lookahead distances recorded in traces (the simulator's max prefetch depth)


class OffloadHandle(AbstractContextManager):
    """The attached scheduler of one model. Use as a context manager or call `detach()`.

    `.stats` gives the counters (per layer and total) as a dict; `.stats_json()` as JSON;
    `.trace()` the recorded routing trace when `record_trace` is on.
    """

    def __init__(self, model: nn.Module, config: RuntimeConfig, *, device: str | torch.device | None = None,
                 record_trace: bool | None = None, trace_meta: dict | None = None):
        self.model = model
        self.config = config
        self.blocks, self.device = attach_target(model, config, device)
        self.cuda = self.device.type == "cuda"
        self.L = len(self.blocks)
        self.E = int(self.blocks[0].experts.num_experts)
        self.k = config.model.top_k
        self.params = SchedulerParams.from_config(config)
        self.sched = Scheduler(self.params)
        self.counters: Counters = self.sched.counters
        self.bytes_moved = np.zeros(self.L, dtype=np.int64)
        self.steps = 0
        self.tokens_generated = 0
        self._stall_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        record = config.runtime.record_trace if record_trace is None else record_trace
        self.lookahead = max(config.prefetch.depth, TRACE_LOOKAHEAD if record else 0)
        self.recorder = (TraceRecorder(self.L, self.E, self.k, TRACE_LOOKAHEAD,
                                       {"routing": "real", "fingerprint": config.model.fingerprint,
                                        **(trace_meta or {})}) if record else None)
        self._seq_base = 0
        self._last_batch = 0
        # Seam for replay: (layer, predictions [D, T, k]) -> the predictions to plan from
        # (tuner.validate.TraceReplay hands the trace's recorded ones).
        self.prediction_source = None
        self._attached = False
        self._attach()

    # ---- attach / detach ------------------------------------------------------------------
    def _attach(self) -> None:
        register_backend()
        model, cfg = self.model, self.config
        first = self.blocks[0].experts
        self.dtype = first.gate_up_proj.dtype
        pin = self.cuda and cfg.runtime.pin_memory
        self.store = HostStore(self.blocks, pin, self)
        self.host_gate_up, self.host_down = self.store.gate_up, self.store.down
        self.gate_up_shape, self.down_shape = self.store.gate_up_shape, self.store.down_shape
        # Everything that is not a routed expert lives on the device.
        model.to(self.device)
        self.expert_bytes = self.store.expert_bytes
        S = self.sched.num_slots
        self.pool = SlotPool(self.store, S, self.device)
        self.pool_gate_up, self.pool_down = self.pool.gate_up, self.pool.down
        # Predictor: every MoE layer's gate, stacked, to score the next layers' experts.
        self.pred_weight_t = torch.stack([b.router.weight.detach().to(self.device, self.dtype).t()
                                          for b in self.blocks]).contiguous()  # [L, H, E]
        self._lut_dev = torch.zeros((self.L, self.E), dtype=torch.int64, device=self.device)
        self._lut_dirty: set[int] = set(range(self.L))
        self._need_weights = self.recorder is not None or self.params.threshold < 1.0
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=self.device)
            self.slot_ready = [torch.cuda.Event() for _ in range(S)]
            self.layer_done = [torch.cuda.Event() for _ in range(self.L)]
            self.slot_user = [-1] * S  # MoE layer whose experts last read the slot
            self.pending: set[int] = set()
        self._prev_impl = experts_implementation(model)
        self.kernels = PoolKernels(self.blocks, self.pool, self.device, cfg.runtime.experts_kernel,
                                   default=self._prev_impl.get("") or "grouped_mm")
        model.set_experts_implementation(BACKEND_NAME)
        self._hooks = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       model.register_forward_hook(self._post_forward)]
        # Warm start: fill the slots with the profile's hottest experts.
        for ld in self.sched.warm_start_loads():
            self.pool.fill(self.store, ld.layer, ld.expert, ld.slot)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._attached = True
        log.info("expertflow attached: %d MoE layers x %d experts, %d GPU slots (%s, %s), prefetch depth %d",
                 self.L, self.E, S, cfg.cache.scope, cfg.cache.policy, cfg.prefetch.depth)

    def detach(self) -> None:
        """Restore the model exactly: expert parameters back in the tree, original backend."""
        if not self._attached:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for h in self._hooks:
            h.remove()
        self.store.restore()
        restore_experts_implementation(self.model, self._prev_impl)
        self.pool = self.pool_gate_up = self.pool_down = self._lut_dev = self.kernels = None
        self._attached = False
        if self.cuda:
            torch.cuda.empty_cache()  # hand the slot pool's memory back

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---- step bookkeeping (model forward hooks) --------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        if ref is None:
            return None
        b, s = int(ref.shape[0]), int(ref.shape[1])
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past == 0:
            self._seq_base += self._last_batch
            self._last_batch = b
        kind = PREFILL if past == 0 or s > 1 else DECODE
        self._step_kind = kind
        self._step_tokens = b * s
        if self.recorder is not None:
            seq = np.repeat(np.arange(b) + self._seq_base, s)
            pos = np.tile(np.arange(past, past + s), b)
            self.recorder.begin_step(seq, pos, kind)
        return None

    def _post_forward(self, module, args, output):
        self.steps += 1
        if getattr(self, "_step_kind", PREFILL) == DECODE:
            self.tokens_generated += self._step_tokens
        if self.recorder is not None:
            self.recorder.end_step()
        return None

    # ---- the hot path ------------------------------------------------------------------------
    def _layer_forward(self, m: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        D = min(self.lookahead, self.L - 1 - m)
        if D > 0:
            logits = torch.matmul(h, self.pred_weight_t[m + 1:m + 1 + D])  # [D, T, E]
            idx = torch.cat((ids.unsqueeze(0), logits.topk(k, dim=-1).indices))  # [1 + D, T, k]
        else:
            idx = ids
        host = idx.cpu().numpy()  # the one device->host sync of this layer
        ids_np = host[0] if D > 0 else host  # [T, k]
        pred_np = host[1:] if D > 0 else None  # [D, T, k]
        # Weights cross to the host only when a decision or the trace needs them.
        w_np = w.float().cpu().numpy() if self._need_weights else None
        if self.recorder is not None:
            self.recorder.add_layer(m, ids_np, w_np, pred_np)
        preds = None
        if pred_np is not None and self.params.prefetch_depth > 0:
            preds = pred_np[:self.params.prefetch_depth]
            if self.prediction_source is not None:
                preds = self.prediction_source(m, preds)
        plan = self.sched.visit(m, ids_np, w_np, preds)
        out = self._compute(m, plan.route, h, ids, ids_np, w)
        self._issue(plan.prefetches)
        return out

    def _compute(self, m: int, route: Route, h: torch.Tensor, ids: torch.Tensor, ids_np: np.ndarray,
                 w: torch.Tensor) -> torch.Tensor:
        """Run the layer's experts over the slot pool with transformers' own kernel.

        One wave (the usual case): one kernel call over [T, k] with expert ids remapped to slots,
        dropped pairs given weight 0 and a valid slot: the same arithmetic as the un-offloaded
        model's backend. Several waves (a layer needs more experts than it has slots): each wave
        computes its token-expert pairs as k=1 rows, the weighted pair outputs are scattered into
        a [T*k, H] buffer and summed over k once at the end, as the kernel itself would: the
        result does not depend on how the experts were split into waves.
        """
        T, k = ids_np.shape
        if len(route.waves) == 1:
            wave = route.waves[0]
            self._issue(wave.loads)
            self._wait(m, wave.slots)
            if self.params.threshold >= 1.0:
                if self.kernels.name(T * k) == "batched_mm":
                    # Hot path (decode): expert ids -> slots on the device, no host->device copy.
                    out = self.kernels.batched(m, h, self._device_lut(m)[ids], w)
                    self._release(m, wave.slots)
                    return out
                w_t = w
            else:
                w_t = torch.from_numpy(route.weights).to(self.device, dtype=w.dtype, non_blocking=True)
            lut = np.full(self.E, wave.slots[0], dtype=np.int64)
            lut[wave.experts] = wave.slots
            out = self.kernels.run(m, h, lut[ids_np], w_t)  # slots [T, k]
            self._release(m, wave.slots)
            return out
        buf = h.new_zeros((T * k, h.shape[-1]))  # weighted output per token-expert pair
        flat_ids = ids_np.reshape(-1)
        flat_keep = route.keep.reshape(-1)
        weights = route.weights if route.weights is not None else w.float().cpu().numpy()
        flat_w = np.asarray(weights, dtype=np.float32).reshape(-1)
        for wave in route.waves:
            self._issue(wave.loads)
            self._wait(m, wave.slots)
            lut = np.full(self.E, -1, dtype=np.int64)
            lut[wave.experts] = wave.slots
            pairs = np.flatnonzero(flat_keep & (lut[flat_ids] >= 0))  # [P] flat t*k + j
            pairs_t = torch.from_numpy(pairs).to(self.device, non_blocking=True)
            w_t = torch.from_numpy(flat_w[pairs][:, None]).to(self.device, dtype=w.dtype, non_blocking=True)
            x = h.index_select(0, pairs_t // k)  # [P, H]
            buf.index_copy_(0, pairs_t, self.kernels.run(m, x, lut[flat_ids[pairs]][:, None], w_t))
            self._release(m, wave.slots)
        return buf.view(T, k, -1).sum(dim=1).to(h.dtype)

    def _device_lut(self, m: int) -> torch.Tensor:
        """Layer m's expert -> slot table on the device, refreshed only after loads into m."""
        if m in self._lut_dirty:
            row = [max(s, 0) for s in self.sched.slot_of[m]]
            self._lut_dev[m].copy_(torch.tensor(row, dtype=torch.int64), non_blocking=True)
            self._lut_dirty.discard(m)
        return self._lut_dev[m]

    def kernel_name(self, pairs: int) -> str:
        """The transformers experts kernel the runtime uses for `pairs` token-expert pairs."""
        return self.kernels.name(pairs)

    def run_experts(self, m: int, h: torch.Tensor, slots: np.ndarray, weights: torch.Tensor) -> torch.Tensor:
        """Run MoE layer m's experts kernel over the slot pool (slots [T, k] in place of expert
        ids): the call the runtime makes per wave; the profiler times it."""
        return self.kernels.run(m, h, slots, weights)

    def _issue(self, loads) -> None:
        if not loads:
            return
        for ld in loads:
            self._lut_dirty.add(ld.layer)
        if not self.cuda:
            for ld in loads:
                self.pool_gate_up[ld.slot].copy_(self.host_gate_up[ld.layer][ld.expert])
                self.pool_down[ld.slot].copy_(self.host_down[ld.layer][ld.expert])
                self.bytes_moved[ld.layer] += self.expert_bytes
            return
        with torch.cuda.stream(self.copy_stream):
            for ld in loads:
                user = self.slot_user[ld.slot]
                if user >= 0:  # the slot's last reader (a layer's experts) must be done
                    self.copy_stream.wait_event(self.layer_done[user])
                self.pool_gate_up[ld.slot].copy_(self.host_gate_up[ld.layer][ld.expert], non_blocking=True)
                self.pool_down[ld.slot].copy_(self.host_down[ld.layer][ld.expert], non_blocking=True)
                self.slot_ready[ld.slot].record(self.copy_stream)
                self.pending.add(ld.slot)
                self.bytes_moved[ld.layer] += self.expert_bytes

    def _wait(self, m: int, slots: list[int]) -> None:
        if not self.cuda:
            return
        waits = [s for s in slots if s in self.pending]
        if not waits:
            return
        stream = torch.cuda.current_stream(self.device)
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record(stream)
        for s in waits:
            stream.wait_event(self.slot_ready[s])  # only the experts this layer needs
            self.pending.discard(s)
        t1.record(stream)
        self._stall_events.append((m, t0, t1))
        if len(self._stall_events) > 4096:
            self._resolve_stalls()

    def _release(self, m: int, slots: list[int]) -> None:
        """Mark `slots` as read by layer m's experts, which end at layer_done[m].

        Re-recording layer_done[m] later only moves it later in the compute stream, so a copy
        that waits on it never overwrites a slot still being read (it may wait a little longer).
        """
        if not self.cuda:
            return
        self.layer_done[m].record(torch.cuda.current_stream(self.device))
        for s in slots:
            self.slot_user[s] = m

    def _resolve_stalls(self) -> None:
        if not self._stall_events:
            return
        self._stall_events[-1][2].synchronize()
        for m, t0, t1 in self._stall_events:
            self.counters.stall_ms[m] += t0.elapsed_time(t1)
        self._stall_events.clear()

    # ---- results ------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Counters per MoE layer and in total (hits, misses, prefetches issued/used/wasted,
        bytes moved, stall ms on the compute stream, activated experts per token, ...)."""
        if self.cuda:
            self._resolve_stalls()
        d = self.counters.as_dict()
        d["per_layer"]["bytes_moved"] = self.bytes_moved.tolist()
        t = d["total"]
        t["bytes_moved"] = int(self.bytes_moved.sum())
        t["forward_steps"] = self.steps
        t["tokens_generated"] = self.tokens_generated
        t["gpu_slots"] = self.sched.num_slots
        return d

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, keep_logits: bool = False):
        """Greedy decoding with the attached model (the lean loop of runtime.generate)."""
        return greedy_generate(self.model, input_ids, max_new_tokens, keep_logits=keep_logits)

    def stats_json(self) -> str:
        return json.dumps(self.stats, indent=2)

    def reset_stats(self) -> None:
        if self.cuda:
            self._resolve_stalls()
        self.counters.reset()
        self.bytes_moved[:] = 0
        self.steps = self.tokens_generated = 0

    def trace(self) -> RoutingTrace:
        if self.recorder is None:
            raise RuntimeError("this handle was attached without record_trace=True")
        return self.recorder.trace()


def offload(model: nn.Module, config: RuntimeConfig | str, *, device: str | None = None,
            record_trace: bool | None = None, trace_meta: dict | None = None) -> OffloadHandle:
    """Attach ExpertFlow's scheduler to `model` following `config` (a RuntimeConfig or a path).

    Returns a handle with `.stats`, `.detach()`; usable as a context manager.
    """
    if not isinstance(config, RuntimeConfig):
        config = load_config(config)
    t0 = time.perf_counter()
    handle = OffloadHandle(model, config, device=device, record_trace=record_trace, trace_meta=trace_meta)
    log.debug("attach took %.2f s", time.perf_counter() - t0)
    return handle
