"""The graph engine: batch-B decode as one CUDA graph per (batch, KV bucket, step parity).

How a decode step runs (shapes: B batch, L MoE layers, E experts, k top-k, H hidden):
* Transformers' own decoder layers, called in a short model loop of ours (embeddings, rotary,
  layers, norm, LM head): transformers' model-level forward builds masks and caches with host
  logic per call, so the engine passes a static KV cache (`StaticKV`, positions on the device)
  and a mask computed on the device instead. Every architecture whose layers take
  (hidden, attention_mask, position_ids, cache, position_embeddings) works unchanged.
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

Prefill runs eagerly through the same layers (misses copied to the GPU per expert, in one pass
per layer). On CPU the decode step runs eagerly too, with a torch path that reads through the
same tables (or the Triton kernel under TRITON_INTERPRET=1): the bookkeeping is the same
everywhere, only the capture is CUDA's.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..config import RuntimeConfig
from ..core import SchedulerParams
from ..core.engine_cache import DECODE_STEP, PREFILL_STEP, EngineScheduler, staging_ranks
from ..errors import DeviceError, ModelError
from ..runtime.adapters import find_moe_blocks
from ..runtime.offload import BACKEND_NAME, check_config_matches, register_backend
from ..runtime.store import HostStore, SlotPool
from . import kernels
from .static_cache import StaticKV

log = logging.getLogger(__name__)

RING = 4  # steps of routed ids kept on the device / in pinned memory (the host is <= 2 behind)
MIN_BUCKET = 128  # smallest KV length a decode graph attends over; buckets double up to max_len


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, prompt + new] on the CPU
    new_tokens: int
    prefill_s: float
    decode_s: float
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] float32 per new token

    @property
    def decode_tokens_per_s(self) -> float:
        b = self.sequences.shape[0]
        steps = max(self.new_tokens - 1, 0)
        return b * steps / self.decode_s if self.decode_s > 0 else 0.0


def device_adaptive_k(ids: torch.Tensor, w: torch.Tensor, threshold: float, min_k: int,
                      renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """expertflow.core.adaptive_k's rule on the device: (ids with dropped = -1, new weights)."""
    wd = w.to(torch.float32).to(torch.float64)  # [T, k]
    k = wd.shape[1]
    pos = torch.arange(k, device=w.device)
    wi, wj = wd[:, :, None], wd[:, None, :]
    heavier = (wi > wj) | ((wi == wj) & (pos[:, None] < pos[None, :]))  # [T, i, j]
    rank = heavier.sum(dim=1)
    mass_before = (heavier * wi).sum(dim=1)
    total = wd.sum(dim=1, keepdim=True)
    keep = (mass_before < threshold * total) | (rank < min_k)
    out = torch.where(keep, wd, torch.zeros_like(wd))
    if renormalize:
        kept = out.sum(dim=1, keepdim=True)
        out = out * torch.where(kept > 0, total / kept, torch.ones_like(kept))
    new_w = out.to(torch.float32).to(w.dtype)
    return torch.where(keep, ids, torch.full_like(ids, -1)), new_w


class EngineReplay:
    """Routing source for benchmarks and validation: the trace's (ids, weights) per position of
    the current sequence, indexed on the device by the step's position (so it replays inside a
    graph). Batch 1. The router still runs (its cost is measured); its result is replaced."""

    def __init__(self, engine: GraphEngine, max_rows: int):
        L, k = engine.L, engine.k
        dev = engine.device
        self.ids = torch.zeros((L, max_rows, k), dtype=torch.long, device=dev)
        self.w = torch.zeros((L, max_rows, k), dtype=engine.store.dtype, device=dev)

    def load(self, ids: np.ndarray, weights: np.ndarray) -> None:
        """ids / weights [n, L, k] of one sequence, in position order."""
        n = ids.shape[0]
        self.ids[:, :n].copy_(torch.as_tensor(np.ascontiguousarray(ids.transpose(1, 0, 2))))
        self.w[:, :n].copy_(torch.as_tensor(np.ascontiguousarray(weights.transpose(1, 0, 2))).to(self.w.dtype))

    def route(self, m: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[m].index_select(0, positions), self.w[m].index_select(0, positions)


class GraphEngine(AbstractContextManager):
    """The graph engine attached to one model; see the module docstring.

    `generate(input_ids, max_new_tokens)` runs prefill + greedy decode; `.stats` gives the
    counters like the eager handle's; `detach()` restores the model.
    """

    def __init__(self, model: nn.Module, config: RuntimeConfig, *, device: str | torch.device | None = None,
                 kernel: str = "auto", graphs: bool | None = None):
        self.model = model
        self.config = config
        self.blocks = find_moe_blocks(model)
        check_config_matches(model, config)
        self.device = torch.device(device or config.runtime.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"config runtime.device is {config.runtime.device!r} but no CUDA GPU is "
                              "available; pass device='cpu' or run on a GPU machine")
        self.cuda = self.device.type == "cuda"
        self.graphs_on = self.cuda if graphs is None else (graphs and self.cuda)
        if kernel == "auto":
            kernel = "triton" if kernels.triton_available() and (self.cuda or kernels.interpreter_on()) else "torch"
        self.kernel = kernel
        self._check_supported()
        self.L = len(self.blocks)
        self.E = int(self.blocks[0].experts.num_experts)
        self.k = config.model.top_k
        self.params = SchedulerParams.from_config(config)
        self.sched = EngineScheduler(self.params, config.cache.read_through_slots)
        self.counters = self.sched.counters
        self.R = max(max(self.sched.staging), 1)
        register_backend()
        pin = self.cuda and config.runtime.pin_memory
        self._prev_impl = model.get_experts_implementation() if hasattr(model, "get_experts_implementation") \
            else {"": model.config._experts_implementation}
        self.store = HostStore(self.blocks, pin, self)
        model.to(self.device)
        self.pool = SlotPool(self.store, self.sched.num_slots, self.device)
        for ld in self.sched.warm_start_loads():
            self.pool.fill(self.store, ld.layer, ld.expert, ld.slot)
        self.I = self.store.down_shape[1]
        self._build_tables()
        base = getattr(model, "model", model)
        self.layers = list(base.layers)
        self.embed = model.get_input_embeddings()
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        params = inspect.signature(type(self.layers[0]).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        model.set_experts_implementation(BACKEND_NAME)
        self.replay: EngineReplay | None = None
        self.batch = 0
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.graphs_on else None
        self._pending: list[tuple[int, int, object]] = []  # (kind, step, event or (ids, weights))
        self.enqueued = 0  # steps run or launched so far (the index of the next one)
        self.bytes_moved = 0
        self.tokens_generated = 0
        self._mode = "decode"
        self._parity = 0
        self._attached = True
        if self.cuda:
            torch.cuda.synchronize(self.device)
        log.info("expertflow graph engine attached: %d MoE layers x %d experts, %d GPU slots "
                 "(%d read-through per layer and parity), kernel %s, graphs %s", self.L, self.E,
                 self.sched.num_slots, self.R, self.kernel, self.graphs_on)

    # ---- checks ---------------------------------------------------------------------------
    def _check_supported(self) -> None:
        cfg = self.model.config
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"the graph engine computes SiLU-gated experts; this model's hidden_act is "
                             f"{act!r}: use runtime.engine: eager")
        ex = self.blocks[0].experts
        if getattr(ex, "is_transposed", False) or not getattr(ex, "is_concatenated", True):
            raise ModelError(f"{type(ex).__name__} stores gate/up transposed or interleaved; the graph "
                             "engine reads [gate; up] rows: use runtime.engine: eager")
        types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if types - {"full_attention"}:
            raise ModelError(f"the graph engine attends over full causal attention; this model has "
                             f"{sorted(types)} layers: use runtime.engine: eager")
        base = getattr(self.model, "model", self.model)
        for name in ("norm", "rotary_emb", "layers"):
            if not hasattr(base, name):
                raise ModelError(f"{type(base).__name__} has no .{name}; the graph engine needs the "
                                 "standard decoder layout: use runtime.engine: eager")

    # ---- tables ---------------------------------------------------------------------------
    def _build_tables(self) -> None:
        """Device tables, packed in one buffer so one copy updates them all:
        gu [L, E], dn [L, E] addresses; loc [L, E] slot or -1; stage_gu / stage_dn / stage_loc
        [2, L, R] per parity (0 / -1 = none)."""
        L, E, R = self.L, self.E, self.R
        st, pool = self.store, self.pool
        gu_bytes = st.gate_up[0][0].numel() * st.gate_up[0].element_size()
        dn_bytes = st.down[0][0].numel() * st.down[0].element_size()
        self._gu_host = np.array([[st.gate_up[m].data_ptr() + e * gu_bytes for e in range(E)] for m in range(L)],
                                 dtype=np.int64)
        self._dn_host = np.array([[st.down[m].data_ptr() + e * dn_bytes for e in range(E)] for m in range(L)],
                                 dtype=np.int64)
        self._gu_pool, self._dn_pool = pool.gate_up.data_ptr(), pool.down.data_ptr()
        self._gu_bytes, self._dn_bytes = gu_bytes, dn_bytes
        self.spans = pool.spans()
        n = 3 * L * E + 3 * 2 * L * R
        self._tables_dev = torch.zeros(n, dtype=torch.int64, device=self.device)
        pin = self.cuda
        self._tables_host = [torch.zeros(n, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._upload_i = 0
        o = 0
        views = []
        for shape in ((L, E), (L, E), (L, E), (2, L, R), (2, L, R), (2, L, R)):
            size = int(np.prod(shape))
            views.append(self._tables_dev[o:o + size].view(*shape))
            o += size
        self.gu_table, self.dn_table, self.loc_table, self.stage_gu, self.stage_dn, self.stage_loc = views
        self._upload()

    def _packed(self) -> np.ndarray:
        L, R = self.L, self.R
        loc = self.sched.table()  # [L, E]
        gu = np.where(loc >= 0, self._gu_pool + loc * self._gu_bytes, self._gu_host)
        dn = np.where(loc >= 0, self._dn_pool + loc * self._dn_bytes, self._dn_host)
        stage = np.full((2, L, R), -1, dtype=np.int64)
        for parity in (0, 1):
            t = self.sched.stage_table(parity)
            stage[parity, :, :t.shape[1]] = t[:, :R]
        s_gu = np.where(stage >= 0, self._gu_pool + stage * self._gu_bytes, 0)
        s_dn = np.where(stage >= 0, self._dn_pool + stage * self._dn_bytes, 0)
        return np.concatenate([gu.ravel(), dn.ravel(), loc.ravel(), s_gu.ravel(), s_dn.ravel(), stage.ravel()])

    def _upload(self) -> None:
        """Enqueue the host's tables on the compute stream (double-buffered pinned source: the
        buffer is rewritten two decisions later, after the step that follows this copy)."""
        buf = self._tables_host[self._upload_i]
        self._upload_i ^= 1
        buf.numpy()[:] = self._packed()
        self._tables_dev.copy_(buf, non_blocking=self.cuda)

    # ---- per-batch buffers ----------------------------------------------------------------
    def _setup_batch(self, B: int) -> None:
        if B == self.batch:
            return
        self._drain()
        dev, L, k = self.device, self.L, self.k
        max_len = self.config.memory.max_context_tokens
        self.max_len = max_len
        self.kv = StaticKV(B, max_len, dev, self.store.dtype)
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

    def use_replay(self, max_rows: int) -> EngineReplay:
        """Route from a trace instead of the router (see EngineReplay). Graphs captured before
        read the router: they are dropped and captured again on first use."""
        self.replay = EngineReplay(self, max_rows)
        self.graphs.clear()
        return self.replay

    # ---- the experts backend --------------------------------------------------------------
    def _layer_forward(self, m: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:
            ids, w = self.replay.route(m, self.kv.positions)
        w_router = w  # the host's dropped-mass counter needs the router's own weights
        if self.params.threshold < 1.0:
            ids, w = device_adaptive_k(ids, w, self.params.threshold, self.params.min_k, self.params.renormalize)
        if self._mode == "prefill":
            self._prefill_ids[m].append(ids.cpu().numpy())
            self._prefill_w[m].append(w_router.float().cpu().numpy())
            return self._experts_eager(m, h, ids, w, stage_writes=False)
        self.step_ids[m].copy_(ids.view(self.batch, self.k))
        self.step_w[m].copy_(w_router.view(self.batch, self.k))
        if self.kernel == "triton":
            p = self._parity
            return kernels.experts_through_table(h, ids, w, m, self.gu_table, self.dn_table,
                                                 self.stage_gu[p], self.stage_dn[p], self.spans, self.I)
        return self._experts_eager(m, h, ids, w, stage_writes=True)

    def _experts_eager(self, m: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                       stage_writes: bool) -> torch.Tensor:
        """Torch path through the same tables (host reads of ids: prefill, CPU decode): each
        needed expert once, from its slot or copied from the host; with `stage_writes`, the r-th
        miss is written into staging slot r as the kernel does."""
        ids_np = ids.cpu().numpy()
        loc = self.loc_table[m].tolist()
        out = torch.zeros_like(h)
        stage = self.stage_loc[self._parity, m].tolist() if stage_writes else []
        rank = dict(staging_ranks(ids_np, [s >= 0 for s in loc])) if stage_writes else {}
        wd = w.to(h.dtype)
        for e in sorted({int(x) for x in ids_np.ravel() if x >= 0}):
            s = loc[e]
            if s >= 0:
                gu, dn = self.pool.gate_up[s], self.pool.down[s]
            else:
                gu = self.store.gate_up[m][e].to(self.device, non_blocking=True)
                dn = self.store.down[m][e].to(self.device, non_blocking=True)
                self.bytes_moved += self.store.expert_bytes
                r = rank.get(e, len(stage))
                if r < len(stage) and stage[r] >= 0:
                    self.pool.gate_up[stage[r]].copy_(gu)
                    self.pool.down[stage[r]].copy_(dn)
            tok, j = np.nonzero(ids_np == e)
            tok_t = torch.as_tensor(tok, device=self.device)
            j_t = torch.as_tensor(j, device=self.device)
            g, u = nn.functional.linear(h.index_select(0, tok_t), gu).chunk(2, dim=-1)
            y = nn.functional.linear(nn.functional.silu(g) * u, dn)
            out.index_add_(0, tok_t, y * wd[tok_t, j_t, None])
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

    def _bucket(self, length: int) -> int:
        b = MIN_BUCKET
        while b < length:
            b *= 2
        return min(b, self.max_len)

    def _graph(self, length: int, parity: int):
        key = (self.batch, length, parity)
        g = self.graphs.get(key)
        if g is not None:
            return g
        state = [t.clone() for t in (self.tok, self.positions, self.ring_i)]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels, allocate lazily, outside the capture
                self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for t, s in zip((self.tok, self.positions, self.ring_i), state):
            t.copy_(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._mempool):
            self._decode_step()
        self.graphs[key] = g
        log.debug("captured decode graph batch %d, kv %d, parity %d", *key)
        return g

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
        self._upload()

    def _drain(self) -> None:
        while self._pending:
            self._decide_oldest()

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, keep_logits: bool = False,
                 prefill_chunk: int | None = None) -> GenerationOutput:
        """Greedy decoding of `max_new_tokens` tokens for a batch of equal-length prompts."""
        B, P = input_ids.shape
        self._setup_batch(B)
        if P + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {P} + {max_new_tokens} new tokens exceed memory.max_context_tokens "
                             f"{self.max_len}; raise it (and the budget) or generate fewer tokens")
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
            self.kv.length = self._bucket(c1)
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
            length = self._bucket(P + i)
            parity = self.enqueued % 2
            self._parity = parity
            self.kv.length = length
            if self.graphs_on:
                self._graph(length, parity).replay()
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
        if not self.graphs_on:
            return
        self._drain()
        length = MIN_BUCKET
        while True:
            b = self._bucket(length)
            for parity in (0, 1):
                self._parity = parity
                self.kv.length = b
                self._graph(b, parity)
            if b >= min(max_tokens, self.max_len):
                break
            length = b * 2
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

    def stats_json(self) -> str:
        return json.dumps(self.stats, indent=2)

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
        self.store.restore()
        prev = self._prev_impl
        self.model.set_experts_implementation(prev if len(prev) > 1 else prev.get("") or "grouped_mm")
        self.pool = None
        self._tables_dev = None
        self.kv = None
        self._attached = False
        if self.cuda:
            torch.cuda.empty_cache()

    def __exit__(self, *exc) -> None:
        self.detach()


def replay_generate(engine: GraphEngine, trace, plan) -> dict[str, float]:
    """Generate over `plan` (tuner.validate.replay_schedule: per sequence its trace rows in
    position order and prefill length) with the trace's routing replayed; decode totals."""
    replay = engine.replay if engine.replay is not None else engine.use_replay(max(len(r) for r, _ in plan))
    decode_s = prefill_s = 0.0
    tokens = 0
    for rows, p in plan:
        replay.load(trace.ids[rows], trace.weights[rows])
        out = engine.generate(torch.zeros((1, p), dtype=torch.long), len(rows) - p + 1)
        decode_s += out.decode_s
        prefill_s += out.prefill_s
        tokens += out.new_tokens - 1
    return {"decode_s": decode_s, "prefill_s": prefill_s, "decode_tokens": tokens, "sequences": len(plan)}


def attach(model: nn.Module, config: RuntimeConfig | str, *, device: str | None = None, **kwargs) -> GraphEngine:
    """Attach the graph engine to `model` following `config` (a RuntimeConfig or a path)."""
    if not isinstance(config, RuntimeConfig):
        from ..config import load_config

        config = load_config(config)
    return GraphEngine(model, config, device=device, **kwargs)
