"""The graph engine: batch-B decode as one CUDA graph per (batch, KV bucket, step parity).

How a decode step runs (shapes: B batch, L MoE layers, E experts, k top-k, H hidden):
* Transformers' own decoder layers in a short model loop of ours (embeddings, rotary, layers,
  norm, LM head): the model-level forward builds masks and caches with host logic per call, so
  the engine passes a static KV cache (`StaticKV`, positions on the device) and a device mask.
* Routed experts go through the "expertflow" experts backend to `_layer_forward`, which
  (adaptive-k on the device when the threshold is < 1) writes the layer's kept ids into a
  per-step buffer and runs the Triton kernel that reads every expert through the device address
  table: a GPU slot for a hit, the pinned host store for a miss (zero-copy), writing the r-th
  miss into staging slot r (read-through admission).
* The step ends by writing the next token (argmax) into the input buffer, the routed ids into a
  device ring whose copy lands in pinned host memory, and advancing the positions: replays chain
  with no host work in between.
* The host decides step n (expertflow.core.engine_cache.EngineScheduler) after step n+1 was
  launched and uploads the new tables in stream order before step n+2.

Prefill runs eagerly through the same layers (misses copied per expert). On CPU the decode step
runs eagerly too, through the same tables (torch path, or Triton under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import inspect
import logging
import time
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

from ..config import RuntimeConfig, load_config
from ..core import SchedulerParams
from ..core.engine_cache import DECODE_STEP, PREFILL_STEP, EngineScheduler
from ..runtime.backend import (BACKEND_NAME, attach_target, experts_implementation, register_backend,
                               restore_experts_implementation)
from ..runtime.store import HostStore, SlotPool
from . import kernels
from .fusion import Fusions, fuse_enabled
from .graphs import StepGraphs, kv_bucket
from .memory_cap import AllocatorCap, budget_errors, over_budget
from .static_cache import StaticKV
from .support import GenerationOutput, check_context, check_supported, device_adaptive_k, experts_torch
from .tables import DeviceTables

log = logging.getLogger(__name__)

RING = 4  # steps of routed ids kept on the device / in pinned memory (the host is <= 2 behind)


class GraphEngine(AbstractContextManager):
    """The graph engine attached to one model; see the module docstring.

    `generate(input_ids, max_new_tokens)` runs prefill + greedy decode; `.stats` gives the
    counters like the eager handle's; `detach()` restores the model. `fuse=False` (or
    EXPERTFLOW_ENGINE_FUSE=0) leaves out the kernel-count fusions of fusion.py but the RMSNorm one.
    """

    def __init__(self, model: nn.Module, config: RuntimeConfig, *, device: str | torch.device | None = None,
                 kernel: str = "auto", graphs: bool | None = None, fuse: bool = True):
        fuse_on = fuse_enabled(fuse)  # a bad EXPERTFLOW_ENGINE_FUSE fails here, before the model is touched
        self.model = model
        self.config = config
        self.blocks, self.device = attach_target(model, config, device)
        self.cuda = self.device.type == "cuda"
        self.graphs_on = self.cuda if graphs is None else (graphs and self.cuda)
        if kernel == "auto":
            kernel = "triton" if kernels.triton_available() and (self.cuda or kernels.interpreter_on()) else "torch"
        self.kernel = kernel
        check_supported(model, self.blocks)
        self.L = len(self.blocks)
        self.E = int(self.blocks[0].experts.num_experts)
        self.k = config.model.top_k
        self.params = SchedulerParams.from_config(config)
        self.sched = EngineScheduler(self.params, config.cache.read_through_slots)
        self.counters = self.sched.counters
        self.R = max(max(self.sched.staging), 1)
        register_backend()
        self.store = self.fusions = None
        self._attached = False
        self._cap = AllocatorCap(self.device, config.memory.budget_bytes) \
            if self.cuda and config.memory.enforce_budget else None
        try:
            self._attach(model, config, fuse_on)
        except torch.OutOfMemoryError as exc:
            self._undo()
            raise over_budget(config, self.sched.num_slots, self.device, exc) from exc
        except BaseException:
            self._undo()
            raise

    def _attach(self, model: nn.Module, config: RuntimeConfig, fuse_on: set[str]) -> None:
        pin = self.cuda and config.runtime.pin_memory
        self._prev_impl = experts_implementation(model)
        self.store = HostStore(self.blocks, pin, self)
        model.to(self.device)
        self.pool = SlotPool(self.store, self.sched.num_slots, self.device)
        for ld in self.sched.warm_start_loads():
            self.pool.fill(self.store, ld.layer, ld.expert, ld.slot)
        self.I = self.store.down_shape[1]
        self.tables = DeviceTables(self.sched, self.store, self.pool, self.device, self.R)
        t = self.tables
        self.gu_table, self.dn_table, self.loc_table = t.gu, t.dn, t.loc
        self.stage_gu, self.stage_dn, self.stage_loc = t.stage_gu, t.stage_dn, t.stage_loc
        self.spans = self.pool.spans()
        self.fusions = Fusions(model, triton=self.kernel == "triton", on=fuse_on)
        base = getattr(model, "model", model)
        self.layers = list(base.layers)
        self.embed = model.get_input_embeddings()
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        params = inspect.signature(type(self.layers[0]).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        model.set_experts_implementation(BACKEND_NAME)
        self.replay = None  # an EngineReplay routes from a trace instead of the router
        self.batch = 0
        self.graphs = StepGraphs(self.device) if self.graphs_on else StepGraphs(None)
        self._pending: list[tuple[int, int, object]] = []  # (kind, step, event or (ids, weights))
        self.enqueued = 0  # steps run or launched so far (the index of the next one)
        self.bytes_moved = 0
        self.tokens_generated = 0
        self._mode = "decode"
        self._parity = 0
        self._running = False  # inside generate() / capture(): the model loop is ours
        self._attached = True
        if self.cuda:
            torch.cuda.synchronize(self.device)
        log.info("expertflow graph engine attached: %d MoE layers x %d experts, %d GPU slots "
                 "(%d read-through per layer and parity), kernel %s, graphs %s, fusions %s", self.L, self.E,
                 self.sched.num_slots, self.R, self.kernel, self.graphs_on, self.fusions.summary())

    # ---- per-batch buffers ----------------------------------------------------------------
    def _setup_batch(self, B: int) -> None:
        if B == self.batch:
            return
        self._drain()
        dev, L, k = self.device, self.L, self.k
        max_len = self.config.memory.max_context_tokens
        self.max_len = max_len
        self.kv = StaticKV(B, max_len, dev, self.store.dtype, self.fusions.kv_write)
        self.positions = torch.zeros(1, dtype=torch.long, device=dev)  # decode position (static)
        self.kv.positions = self.positions
        self.tok = torch.zeros((B, 1), dtype=torch.long, device=dev)
        self.tok_hist = torch.zeros((B, max_len + 1), dtype=torch.long, device=dev)
        self.logits = torch.zeros((B, self.lm_head.weight.shape[0]), dtype=torch.float32, device=dev)
        self.step_ids = torch.full((L, B, k), -1, dtype=torch.long, device=dev)
        self.step_w = torch.zeros((L, B, k), dtype=torch.float32, device=dev)
        self.ring_ids = torch.full((RING, L, B, k), -1, dtype=torch.long, device=dev)
        self.ring_w = torch.zeros((RING, L, B, k), dtype=torch.float32, device=dev)
        self.ring_i = torch.zeros(1, dtype=torch.long, device=dev)
        self.ring_ids_host = torch.zeros((RING, L, B, k), dtype=torch.long, pin_memory=self.cuda)
        self.ring_w_host = torch.zeros((RING, L, B, k), dtype=torch.float32, pin_memory=self.cuda)
        self._arange = torch.arange(max_len, device=dev)
        self.graphs.clear()
        self.batch = B

    def use_replay(self, max_rows: int):
        """Route from a trace instead of the router (see EngineReplay). Graphs captured before
        read the router: they are dropped and captured again on first use."""
        from .replay import EngineReplay  # noqa: PLC0415 - replay builds on this module

        self.replay = EngineReplay(self, max_rows)
        self.graphs.clear()
        return self.replay

    # ---- the experts backend --------------------------------------------------------------
    def _layer_forward(self, m: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if not self._running:
            raise RuntimeError("the graph engine runs its own decode loop: call engine.generate(...) "
                               "(or attach the eager runtime, expertflow.offload, to use model(...))")
        if self.replay is not None:
            ids, w = self.replay.route(m, self.kv.positions)
        w_router = w  # the host's dropped-mass counter needs the router's own weights
        if self.params.threshold < 1.0:
            ids, w = device_adaptive_k(ids, w, self.params.threshold, self.params.min_k, self.params.renormalize)
        if self._mode == "prefill":
            self._prefill_ids[m].append(ids.cpu().numpy())
            self._prefill_w[m].append(w_router.float().cpu().numpy())
            return self._experts_eager(m, h, ids, w, stage_writes=False)
        record = (self.step_ids[m], self.step_w[m], w_router) if self.fusions.record else None
        if record is None:  # else the kernel writes them, without two copy kernels
            self.step_ids[m].copy_(ids.view(self.batch, self.k))
            self.step_w[m].copy_(w_router.view(self.batch, self.k))
        if self.kernel == "triton":
            p = self._parity
            return kernels.experts_through_table(h, ids, w, m, self.gu_table, self.dn_table, self.stage_gu[p],
                                                 self.stage_dn[p], self.spans, self.I, record=record)
        return self._experts_eager(m, h, ids, w, stage_writes=True)

    def _experts_eager(self, m: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                       stage_writes: bool) -> torch.Tensor:
        stage = self.stage_loc[self._parity, m].tolist() if stage_writes else []
        out, copied = experts_torch(h, ids, w, m, self.loc_table[m].tolist(), stage, self.pool, self.store)
        self.bytes_moved += copied * self.store.expert_bytes
        return out

    # ---- the model loop -------------------------------------------------------------------
    def _mask(self, positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        allowed = self._arange[:length].view(1, -1) <= positions.view(-1, 1)  # [T, length]
        zero = torch.zeros((), dtype=dtype, device=self.device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=self.device)
        return torch.where(allowed, zero, neg).view(1, 1, positions.shape[0], length)

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Layers over `input_ids` [B, T] at self.kv.positions; logits of the last token [B, V]."""
        B, T = input_ids.shape
        h = self.embed(input_ids)
        position_ids = self.kv.positions.view(1, T).expand(B, T)
        pe = self.rotary(h, position_ids)
        mask = self._mask(self.kv.positions, self.kv.length, h.dtype).expand(B, 1, T, self.kv.length)
        kw = {self._cache_kw: self.kv}
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, use_cache=True,
                      position_embeddings=pe, **kw)
            if isinstance(h, tuple):
                h = h[0]
        h = self.norm(h)
        return self.lm_head(h[:, -1])

    def _decode_step(self) -> None:
        """One decode step on static buffers (the body of a graph)."""
        logits = self._forward(self.tok)
        self.logits.copy_(logits.float())
        nxt = logits.argmax(dim=-1).view(self.batch, 1)
        self.tok.copy_(nxt)
        self.tok_hist.index_copy_(1, self.positions + 1, nxt)
        self.ring_ids.index_copy_(0, self.ring_i, self.step_ids.unsqueeze(0))
        self.ring_w.index_copy_(0, self.ring_i, self.step_w.unsqueeze(0))
        self.ring_ids_host.copy_(self.ring_ids, non_blocking=self.cuda)
        self.ring_w_host.copy_(self.ring_w, non_blocking=self.cuda)
        self.ring_i.add_(1).remainder_(RING)
        self.positions.add_(1)

    # ---- decisions ------------------------------------------------------------------------
    def _decide_oldest(self) -> None:
        kind, step, item = self._pending.pop(0)
        if kind == DECODE_STEP:
            if self.cuda:
                item.synchronize()
            r = step % RING
            ids = self.ring_ids_host[r].numpy().copy()  # [L, B, k]
            w = self.ring_w_host[r].numpy().copy()
        else:
            ids, w = item
        assert self.sched.step == step, (self.sched.step, step)
        before = sum(self.counters.misses)
        plan = self.sched.decide(ids, w, kind)
        if kind == DECODE_STEP:
            self.bytes_moved += (sum(self.counters.misses) - before) * self.store.expert_bytes
        else:  # prefill wrote no staging slot: admit its misses by copy
            for (layer, e), slot in plan.entries.items():
                if slot >= 0:
                    self.pool.fill(self.store, layer, e, slot, non_blocking=self.cuda)
                    self.bytes_moved += self.store.expert_bytes
        self.tables.upload()

    def _drain(self) -> None:
        while self._pending:
            self._decide_oldest()

    # ---- generation -----------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, keep_logits: bool = False,
                 prefill_chunk: int | None = None) -> GenerationOutput:
        """Greedy decoding of `max_new_tokens` tokens for a batch of equal-length prompts."""
        self._running = True
        try:
            with self.fusions.active(), budget_errors(self._cap, self.config, self.sched.num_slots, self.device):
                return self._generate(input_ids, max_new_tokens, keep_logits, prefill_chunk)
        finally:
            self._running = False

    @torch.no_grad()
    def _generate(self, input_ids, max_new_tokens, keep_logits, prefill_chunk) -> GenerationOutput:
        B, P = input_ids.shape
        self._setup_batch(B)
        check_context(self.max_len, P, max_new_tokens)
        self._drain()
        dev = self.device
        ids = input_ids.to(dev)
        kept: list[torch.Tensor] = []
        self._sync()
        t0 = time.perf_counter()
        # ---- prefill (eager, chunked): step `self.enqueued`
        self._mode = "prefill"
        self._prefill_ids = [[] for _ in range(self.L)]
        self._prefill_w = [[] for _ in range(self.L)]
        chunk = prefill_chunk or self.config.memory.prefill_chunk_tokens
        logits = None
        for c0 in range(0, P, chunk):
            c1 = min(P, c0 + chunk)
            self.kv.positions = torch.arange(c0, c1, device=dev)
            self.kv.length = kv_bucket(self.max_len, c1)
            logits = self._forward(ids[:, c0:c1])
        self._mode = "decode"
        self.kv.positions = self.positions
        pre_ids = np.stack([np.concatenate(x) for x in self._prefill_ids])  # [L, B*P, k]
        pre_w = np.stack([np.concatenate(x) for x in self._prefill_w])
        self._pending.append((PREFILL_STEP, self.enqueued, (pre_ids, pre_w)))
        self.enqueued += 1
        first = logits.argmax(dim=-1).view(B, 1)
        self.tok.copy_(first)
        self.tok_hist[:, :P].copy_(ids)
        self.tok_hist[:, P:P + 1].copy_(first)
        self.positions.fill_(P)
        self.ring_i.fill_(self.enqueued % RING)  # the ring row of step n is n % RING
        if keep_logits:
            kept.append(logits.float().cpu())
        self._sync()
        t1 = time.perf_counter()
        # ---- decode: launch step n+1, then decide step n
        for i in range(1, max_new_tokens):
            length = kv_bucket(self.max_len, P + i)
            parity = self.enqueued % 2
            self._parity = parity
            self.kv.length = length
            if self.graphs_on:
                self.graphs.get(self, length, parity).replay()
            else:
                self._decode_step()
            ev = None
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(dev))
            self._pending.append((DECODE_STEP, self.enqueued, ev))
            self.enqueued += 1
            while len(self._pending) > 1:
                self._decide_oldest()
            if keep_logits:
                kept.append(self.logits.detach().to("cpu", copy=True))
        self._drain()
        self._sync()
        t2 = time.perf_counter()
        self.kv.seen = P + max_new_tokens
        self.tokens_generated += B * max(max_new_tokens - 1, 0)
        seq = self.tok_hist[:, :P + max_new_tokens].cpu()
        return GenerationOutput(seq, max_new_tokens, t1 - t0, t2 - t1, kept)

    def capture(self, batch: int, max_tokens: int) -> None:
        """Capture every decode graph a generation of up to `max_tokens` positions needs, now
        (benchmarks: keep capture out of the timed region)."""
        self._setup_batch(batch)
        if self.graphs_on:
            self._drain()
            self._running = True
            try:
                with torch.no_grad(), budget_errors(self._cap, self.config, self.sched.num_slots, self.device):
                    self.graphs.capture_all(self, max_tokens)
            finally:
                self._running = False
            self._sync()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- results --------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        self._drain()
        d = self.counters.as_dict()
        t = d["total"]
        t["bytes_moved"] = int(self.bytes_moved)
        t["tokens_generated"] = self.tokens_generated
        t["gpu_slots"] = self.sched.num_slots
        t["steps_decided"] = self.sched.step
        t["engine"] = "graph" if self.graphs_on else "eager-step"
        return d

    def reset_stats(self) -> None:
        self._drain()
        self.counters.reset()
        self.sched.decode = dict.fromkeys(self.sched.decode, 0)
        self.bytes_moved = 0
        self.tokens_generated = 0

    def detach(self) -> None:
        """Restore the model exactly: expert parameters back in the tree, original backend."""
        if not self._attached:
            return
        self._drain()
        self._sync()
        self.graphs.clear()
        self._undo()

    def _undo(self) -> None:
        """Put back what attaching changed (also after a failed attach) and lift the cap."""
        if self.store is not None:
            self.store.restore()
        if self.fusions is not None:
            self.fusions.restore()
        if (prev := getattr(self, "_prev_impl", None)) is not None:
            restore_experts_implementation(self.model, prev)
        self.store = self.fusions = self.pool = self.tables = self.kv = None
        self._attached = False
        if self.cuda:
            torch.cuda.empty_cache()
            if self._cap is not None:
                self._cap.release()

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model: nn.Module, config: RuntimeConfig | str, *, device: str | None = None, **kwargs) -> GraphEngine:
    """Attach the graph engine to `model` following `config` (a RuntimeConfig or a path)."""
    if not isinstance(config, RuntimeConfig):
        config = load_config(config)
    return GraphEngine(model, config, device=device, **kwargs)
