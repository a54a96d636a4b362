"""Eviction policies: which resident expert of a cache partition to drop.

Contract (tests/core/test_policy_contract.py runs it against every registered policy):
- `scores(layers, experts, now)` returns one finite float per resident (layer, expert); the
  cache evicts the lowest score among the evictable ones (not protected, not pinned; ties ->
  the lowest slot). Scores depend only on the `ExpertStats` history, never on wall time,
  so the runtime and the simulator make identical choices on the same trace.
- `pinned(layers, experts)` marks experts that must never be evicted (static policy).
- A policy never mutates the stats; the scheduler records accesses.

Register a new policy with `@register_policy("name")`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

_POLICIES: dict[str, type[EvictionPolicy]] = {}


def register_policy(name: str):
    def deco(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return deco


def policy_names() -> list[str]:
    return list(_POLICIES)


def make_policy(name: str, stats: ExpertStats, **params) -> EvictionPolicy:
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; registered: {', '.join(_POLICIES)}") from None
    return cls(stats, **params)


class ExpertStats:
    """Access history of every (MoE layer, expert): what the policies score.

    `now` counts scheduler steps (one per layer visit); `last_access` is -1 for never.
    `prior` is the profiled activation frequency per layer (rows sum to 1; uniform if unknown).
    The decayed frequency (EMA over the layer's visits) is kept lazily: stored value plus the
    layer visit at which it was stored, decayed on read, so an access costs O(k) not O(E).
    """

    def __init__(self, num_layers: int, num_experts: int, prior: np.ndarray | None = None,
                 decay: float = 0.95):
        shape = (num_layers, num_experts)
        self.last_access = np.full(shape, -1, dtype=np.int64)
        self.count = np.zeros(shape, dtype=np.int64)
        self.predicted = np.zeros(shape, dtype=bool)  # the predictor expects it soon
        self._ema = np.zeros(shape, dtype=np.float64)
        self._ema_at = np.zeros(shape, dtype=np.int64)  # layer visit of the stored value
        self.visits = np.zeros(num_layers, dtype=np.int64)
        self.decay = float(decay)
        if prior is None:
            prior = np.full(shape, 1.0 / num_experts)
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != shape:
            raise ValueError(f"prior must be [{num_layers}, {num_experts}], got {prior.shape}")
        sums = prior.sum(axis=1, keepdims=True)
        self.prior = np.divide(prior, sums, out=np.full(shape, 1.0 / num_experts), where=sums > 0)
        self._prior_norm = self.prior / np.maximum(self.prior.max(axis=1, keepdims=True), 1e-12)

    def record_access(self, layer: int, experts: list[int], now: int) -> None:
        self.visits[layer] += 1
        v = int(self.visits[layer])
        la, cnt, ema, at = self.last_access[layer], self.count[layer], self._ema[layer], self._ema_at[layer]
        d, gain = self.decay, 1.0 - self.decay
        self.predicted[layer] = False  # predictions were for this visit: they have served their purpose
        for e in experts:  # row views + scalar access beat fancy indexing for k <= ~16
            la[e] = now
            cnt[e] += 1
            ema[e] = float(ema[e]) * d ** (v - int(at[e])) + gain
            at[e] = v

    def ema_row(self, layer: int) -> np.ndarray:
        """Decayed access frequency of one layer's experts [E], as of now."""
        return self._ema[layer] * np.power(self.decay, self.visits[layer] - self._ema_at[layer])

    def ema(self) -> np.ndarray:
        """Decayed access frequency [L, E] as of now."""
        return self._ema * np.power(self.decay, self.visits[:, None] - self._ema_at)


class EvictionPolicy(ABC):
    name: ClassVar[str] = "abstract"

    def __init__(self, stats: ExpertStats, **params):
        self.stats = stats

    @abstractmethod
    def scores(self, layers: np.ndarray, experts: np.ndarray, now: int) -> np.ndarray:
        """Keep-worthiness of each resident (layers[i], experts[i]); lowest is evicted first."""

    has_pins: ClassVar[bool] = False

    def pinned(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return np.zeros(len(layers), dtype=bool)


@register_policy("lru")
class LRUPolicy(EvictionPolicy):
    """Least recently used (mixtral-offloading, MoE-Infinity's baseline)."""

    def scores(self, layers, experts, now):
        return self.stats.last_access[layers, experts].astype(np.float64)


@register_policy("lfu")
class LFUPolicy(EvictionPolicy):
    """Least frequently used over the whole run; ties go to the least recently used."""

    def scores(self, layers, experts, now):
        s = self.stats
        recency = (s.last_access[layers, experts] + 1) / float(now + 2)  # in [0, 1)
        return s.count[layers, experts] + recency


@register_policy("static")
class StaticPolicy(EvictionPolicy):
    """Pin the profile's hottest experts; the remaining slots are an LRU scratch area.

    The scheduler decides the pinned set (it knows the partition capacities) and passes it as
    `pinned_mask` [L, E].
    """

    has_pins = True

    def __init__(self, stats: ExpertStats, pinned_mask: np.ndarray | None = None, **params):
        super().__init__(stats)
        self.pinned_mask = (np.zeros_like(stats.predicted) if pinned_mask is None
                            else np.asarray(pinned_mask, dtype=bool))

    def scores(self, layers, experts, now):
        return self.stats.last_access[layers, experts].astype(np.float64)

    def pinned(self, layers, experts):
        return self.pinned_mask[layers, experts]


@register_policy("expertflow")
class ExpertFlowPolicy(EvictionPolicy):
    """Frequency (profiled prior + decayed observed) blended with recency, plus a bonus for
    experts the predictor expects in the next layers.

        score = f * (prior/max_prior + ema/max_ema) / 2 + (1 - f) * decay^age + bonus * predicted

    f = `freq_weight`; age in scheduler steps since the last access, scaled by the number of
    layers (one token's worth of steps). Normalising per layer makes scores comparable across
    layers in a pooled cache.
    """

    def __init__(self, stats: ExpertStats, freq_weight: float = 0.5, prediction_bonus: float = 1.0,
                 steps_per_token: int = 1, **params):
        super().__init__(stats)
        self.freq_weight = float(freq_weight)
        self.prediction_bonus = float(prediction_bonus)
        self.steps_per_token = max(1, int(steps_per_token))

    def scores(self, layers, experts, now):
        s = self.stats
        if layers[0] == layers[-1] and (layers == layers[0]).all():  # one layer's partition
            row = s.ema_row(int(layers[0]))
            ema_e = row[experts] / max(row.max(), 1e-12)
        else:
            ema = s.ema()
            ema_e = ema[layers, experts] / np.maximum(ema.max(axis=1), 1e-12)[layers]
        freq = 0.5 * (s._prior_norm[layers, experts] + ema_e)
        last = s.last_access[layers, experts]
        age = np.where(last >= 0, (now - last) / self.steps_per_token, 1e9)
        recency = np.power(s.decay, np.minimum(age, 1e4))
        f = self.freq_weight
        return f * freq + (1.0 - f) * recency + self.prediction_bonus * s.predicted[layers, experts]
