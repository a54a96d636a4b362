"""What the scheduler decides and from what: its parameters (a plain-value view of the config),
the per-layer slot allocation, and the plan of one layer visit (route, waves, loads, prefetches).

Torch-free, like the rest of expertflow.core; the Scheduler (scheduler.py) and the graph
engine's EngineScheduler (engine_cache.py) decide, the runtime, the engine and the simulator
carry these plans out.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class Load(NamedTuple):
    """Copy expert `expert` of MoE layer `layer` into GPU slot `slot`, evicting `evicted`."""

    layer: int
    expert: int
    slot: int
    evicted: tuple[int, int] | None
    prefetch: bool = False
    distance: int = 0  # prefetch lookahead distance (0 = demand load)


@dataclass
class Wave:
    """Experts computed together; all are resident (or being loaded by `loads`) at once."""

    experts: list[int]
    slots: list[int]
    loads: list[Load]


@dataclass
class Route:
    layer: int
    keep: np.ndarray  # [T, k] bool
    weights: np.ndarray  # [T, k] float32, dropped experts 0 (and kept ones renormalised if set)
    needed: list[int]  # unique kept experts, ascending ids
    hits: int
    misses: int
    waves: list[Wave] = field(default_factory=list)

    @property
    def loads(self) -> list[Load]:
        return [ld for w in self.waves for ld in w.loads]


class LayerPlan(NamedTuple):
    """Everything the scheduler decides for one MoE layer visit, in the one order it decides it."""

    route: Route
    prefetches: list[Load]


@dataclass(frozen=True)
class SchedulerParams:
    """Plain-value view of the RuntimeConfig fields the scheduler uses (torch- and pydantic-free)."""

    num_layers: int
    num_experts: int
    top_k: int
    capacity: int
    scope: str = "per_layer"  # per_layer | pooled
    allocation: str = "uniform"  # uniform | demand
    per_layer_capacity: tuple[int, ...] | None = None
    policy: str = "lru"
    warm_start: bool = True
    priors: tuple[tuple[float, ...], ...] | None = None
    freq_weight: float = 0.5
    decay: float = 0.95
    prediction_bonus: float = 1.0
    threshold: float = 1.0
    min_k: int = 1
    renormalize: bool = False
    prefetch_depth: int = 1
    prefetch_adaptive: bool = False
    prefetch_width: int = 0
    min_precision: float = 0.3
    bandwidth_gbps: float | None = None
    layer_time_ms: float | None = None
    bytes_per_expert: int = 0

    @classmethod
    def from_config(cls, cfg) -> SchedulerParams:
        c, p, a = cfg.cache, cfg.prefetch, cfg.adaptive_k
        return cls(
            num_layers=cfg.model.num_moe_layers, num_experts=cfg.model.num_experts,
            top_k=cfg.model.top_k, capacity=c.capacity_experts, scope=c.scope,
            allocation=c.allocation,
            per_layer_capacity=tuple(c.per_layer_capacity) if c.per_layer_capacity else None,
            policy=c.policy, warm_start=c.warm_start,
            priors=tuple(tuple(r) for r in c.priors) if c.priors is not None else None,
            freq_weight=c.expertflow.freq_weight, decay=c.expertflow.decay,
            prediction_bonus=c.expertflow.prediction_bonus,
            threshold=a.threshold, min_k=a.min_k, renormalize=a.renormalize,
            prefetch_depth=p.depth, prefetch_adaptive=p.adaptive, prefetch_width=p.width,
            min_precision=p.min_precision, bandwidth_gbps=p.bandwidth_gbps,
            layer_time_ms=p.layer_time_ms, bytes_per_expert=cfg.memory.bytes_per_expert,
        )


def allocate_capacity(params: SchedulerParams) -> list[int]:
    """Slots per MoE layer for scope per_layer.

    uniform: equal shares (the remainder to the first layers). demand: greedy water-filling on
    the profiled frequencies: each next slot goes to the layer whose next-hottest uncached expert
    carries the most traffic; this maximises the static hit rate sum_l sum_{i<c_l} p_l[i]
    (AdapMoE allocates slots per layer by a DP on the same objective). Every layer keeps >= 1.
    """
    L, E = params.num_layers, params.num_experts
    if params.per_layer_capacity is not None:
        return list(params.per_layer_capacity)
    cap = min(params.capacity, L * E)
    if cap < L:
        raise ValueError(f"capacity {cap} < {L} layers: per_layer scope needs >= 1 slot per layer")
    if params.allocation == "uniform" or params.priors is None:
        base, extra = divmod(cap, L)
        return [min(E, base + (1 if i < extra else 0)) for i in range(L)]
    prior = np.asarray(params.priors, dtype=np.float64)
    prior = prior / np.maximum(prior.sum(axis=1, keepdims=True), 1e-12)
    ranked = -np.sort(-prior, axis=1)  # [L, E] descending
    alloc = [1] * L
    heap = [(-ranked[i, 1], i) for i in range(L) if E > 1]
    heapq.heapify(heap)
    for _ in range(cap - L):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        alloc[i] += 1
        if alloc[i] < E:
            heapq.heappush(heap, (-ranked[i, alloc[i]], i))
    return alloc
