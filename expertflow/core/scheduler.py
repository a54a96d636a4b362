"""The scheduler's decisions, shared by the runtime and the simulator.

For every MoE layer visit the caller (runtime or simulator) hands over the router's top-k ids
and weights and, when prefetch is on, the predictor's top experts for the next layers. The
scheduler answers with what to do: which experts each token keeps (adaptive-k), which experts
are resident (hits), which to load into which slot and what that evicts (in waves when a layer
needs more experts than its partition holds), and what to prefetch. It keeps the counters.

It never touches a tensor or a clock: the runtime executes the loads with real copies and
kernels, the simulator charges their costs from the profile. Same trace + same config =>
same decisions, exactly.

Shape legend: L = MoE layers (indexed 0..L-1 in model order), E = experts per layer,
T = tokens in the step, k = router top-k, D = prefetch lookahead distances.
"""

from __future__ import annotations

import math

import numpy as np

from . import adaptive_k as _ak
from .counters import Counters
from .plan import LayerPlan, Load, Route, SchedulerParams, Wave, allocate_capacity
from .policies import ExpertStats, make_policy


class _Partition:
    """A set of GPU slots with one eviction policy (one layer's, or the shared pool)."""

    def __init__(self, slots: list[int]):
        self.slots = list(slots)
        n = len(slots)
        self.layer = np.full(n, -1, dtype=np.int64)  # occupant per local slot (-1 = free)
        self.expert = np.full(n, -1, dtype=np.int64)
        self.local_of = {int(s): i for i, s in enumerate(slots)}
        self.free = list(range(n - 1, -1, -1))  # a stack: lowest local slot first
        self.pinned_occupants = 0  # static policy: slots holding pinned experts

    @property
    def capacity(self) -> int:
        return len(self.slots)


class Scheduler:
    """Adaptive-k, expert cache (slots + eviction) and prefetch planning; see module docstring.

    The hot path (one call of `route` and `prefetch` per MoE layer visit) runs on Python ints
    and lists; numpy is used where it vectorises real work (victim scoring, adaptive-k).
    """

    def __init__(self, params: SchedulerParams):
        self.p = params
        L, E = params.num_layers, params.num_experts
        if params.top_k > E:
            raise ValueError(f"top_k {params.top_k} > num_experts {E}")
        prior = np.asarray(params.priors, dtype=np.float64) if params.priors is not None else None
        self.stats = ExpertStats(L, E, prior, params.decay)
        self.counters = Counters(L)
        self.now = 0
        self.slot_of: list[list[int]] = [[-1] * E for _ in range(L)]  # resident slot per expert
        if params.scope == "pooled":
            cap = min(params.capacity, L * E)
            self.partitions = [_Partition(list(range(cap)))]
            self.partition_of_layer = [0] * L
            self.layer_capacity = [cap] * L
        elif params.scope == "per_layer":
            alloc = allocate_capacity(params)
            self.partitions, self.partition_of_layer, start = [], [], 0
            for i, c in enumerate(alloc):
                self.partitions.append(_Partition(list(range(start, start + c))))
                self.partition_of_layer.append(i)
                start += c
            self.layer_capacity = alloc
        else:
            raise ValueError(f"unknown cache scope {params.scope!r}")
        self.num_slots = sum(p.capacity for p in self.partitions)
        self.prefetched: list[list[int]] = [[0] * E for _ in range(L)]  # distance of an unused prefetch
        self.precision = [1.0] * (max(1, params.prefetch_depth) + 1)  # EMA per distance, optimistic
        self.needed_ema = float(params.top_k)
        self.pinned_mask = self._pinned_mask() if params.policy == "static" else None
        self.policy = make_policy(params.policy, self.stats, freq_weight=params.freq_weight,
                                  prediction_bonus=params.prediction_bonus, pinned_mask=self.pinned_mask,
                                  steps_per_token=L)
        self._pins = self.policy.has_pins
        self._pin_rows = self.pinned_mask.tolist() if self.pinned_mask is not None else None

    # ---- setup ----------------------------------------------------------------------------
    def _hottest(self) -> list[list[int]]:
        """Experts per layer in descending prior order (ties: lower id first)."""
        prior = self.stats.prior
        return [[int(e) for e in np.lexsort((np.arange(prior.shape[1]), -prior[i]))]
                for i in range(prior.shape[0])]

    def _layers_of(self, pi: int) -> list[int]:
        return [i for i in range(self.p.num_layers) if self.partition_of_layer[i] == pi]

    def _pinned_mask(self) -> np.ndarray:
        """static: pin the hottest experts, keeping top_k scratch slots per partition (or 1)."""
        L, E = self.p.num_layers, self.p.num_experts
        mask = np.zeros((L, E), dtype=bool)
        hottest = self._hottest()
        k = self.p.top_k
        for pi, part in enumerate(self.partitions):
            scratch = k if part.capacity > k else 1
            n_pin = max(0, part.capacity - scratch)
            layers = self._layers_of(pi)
            if len(layers) == 1:
                mask[layers[0], hottest[layers[0]][:n_pin]] = True
            else:  # pooled: the globally hottest by prior share
                order = np.argsort(-self.stats.prior, axis=None, kind="stable")[:n_pin]
                mask.flat[order] = True
        return mask

    def warm_start_loads(self) -> list[Load]:
        """Loads that fill the cache with the hottest experts before the first token.

        Without priors nothing is loaded (a cold cache). Not counted as misses or prefetches.
        """
        if not self.p.warm_start or self.p.priors is None:
            return []
        loads: list[Load] = []
        hottest = self._hottest()
        E = self.p.num_experts
        for pi, part in enumerate(self.partitions):
            layers = self._layers_of(pi)
            n = len(part.free)  # the free slots (the engine keeps its staging slots out of them)
            if len(layers) == 1:
                keys = [(layers[0], e) for e in hottest[layers[0]][:n]]
            else:
                order = np.argsort(-self.stats.prior, axis=None, kind="stable")[:n]
                keys = [(int(o) // E, int(o) % E) for o in order]
            for layer, e in keys:
                ld = self._admit(layer, e, (), prefetch=False, distance=0)
                if ld is not None:
                    loads.append(ld)
        return loads

    # ---- the cache ------------------------------------------------------------------------
    def _admit(self, layer: int, expert: int, protected, prefetch: bool, distance: int) -> Load | None:
        """Give (layer, expert) a slot in its partition; None if every slot is protected/pinned.

        protected: global slots that must not be evicted.
        """
        part = self.partitions[self.partition_of_layer[layer]]
        evicted = None
        if part.free:
            local = part.free.pop()
        else:
            scores = self.policy.scores(part.layer, part.expert, self.now).astype(np.float64)
            if self._pins:
                scores[self.policy.pinned(part.layer, part.expert)] = np.inf
            for s in protected:
                li = part.local_of.get(s)
                if li is not None:
                    scores[li] = np.inf
            local = int(np.argmin(scores))
            if scores[local] == np.inf:
                return None
            ev_l, ev_e = int(part.layer[local]), int(part.expert[local])
            evicted = (ev_l, ev_e)
            self.slot_of[ev_l][ev_e] = -1
            c = self.counters
            c.evictions[ev_l] += 1
            dist = self.prefetched[ev_l][ev_e]
            if dist:
                c.prefetch_wasted[ev_l] += 1
                self._precision_update(dist, used=False)
                self.prefetched[ev_l][ev_e] = 0
        slot = part.slots[local]
        if self._pins and self._pin_rows[layer][expert]:
            part.pinned_occupants += 1  # pinned experts are never evicted
        part.layer[local] = layer
        part.expert[local] = expert
        self.slot_of[layer][expert] = slot
        if prefetch:
            self.prefetched[layer][expert] = distance
        # An admitted expert counts as just touched, so a wave's later loads never evict it.
        if self.stats.last_access[layer, expert] < self.now:
            self.stats.last_access[layer, expert] = self.now
        return Load(layer, expert, slot, evicted, prefetch, distance)

    def _precision_update(self, distance: int, used: bool) -> None:
        if 0 < distance < len(self.precision):
            self.precision[distance] = 0.9 * self.precision[distance] + 0.1 * float(used)

    def visit(self, layer: int, ids: np.ndarray, weights: np.ndarray, predictions: np.ndarray | None = None,
              decided: tuple[np.ndarray, np.ndarray, float] | None = None) -> LayerPlan:
        """The one entry point per MoE layer visit (runtime and simulator): route the layer's
        tokens (adaptive-k, hits, demand loads), then plan the prefetches for the next layers
        from `predictions` [D, T, w] (None = no prefetch). See `route` and `prefetch`."""
        route = self.route(layer, ids, weights, decided)
        prefetches = self.prefetch(layer, predictions, route) if predictions is not None else []
        return LayerPlan(route, prefetches)

    def route(self, layer: int, ids: np.ndarray, weights: np.ndarray,
              decided: tuple[np.ndarray, np.ndarray, float] | None = None) -> Route:
        """Decide one MoE layer visit. ids/weights: the router's top-k, [T, k].

        `decided`: the adaptive-k outcome for these rows, already computed by `adaptive_k.decide`
        (keep mask, new weights, summed dropped mass). The rule is per row and depends on nothing
        else, so a caller that knows every row in advance (the simulator) decides them all in
        one call; the result is the same bit for bit.
        """
        self.now += 1
        p, c = self.p, self.counters
        ids = np.asarray(ids)
        T = ids.shape[0]
        if p.threshold >= 1.0:
            keep = _ALL_TRUE.get((T, ids.shape[1])) if T <= 8 else None
            if keep is None:
                keep = np.ones(ids.shape, dtype=bool)
            new_w = weights
            needed = sorted(set(ids.ravel().tolist()))
            c.activated[layer] += ids.size
        else:
            if decided is None:
                keep, new_w, dropped = _ak.decide(weights, p.threshold, p.min_k, p.renormalize)
                dropped = float(dropped.sum())
            else:
                keep, new_w, dropped = decided
            needed = sorted(set(ids[keep].tolist()))
            c.activated[layer] += int(keep.sum())
            c.dropped_mass[layer] += dropped
        c.steps[layer] += 1
        c.tokens[layer] += T
        c.unique_needed[layer] += len(needed)
        row = self.slot_of[layer]
        hits = [e for e in needed if row[e] >= 0]
        misses = [e for e in needed if row[e] < 0]
        c.hits[layer] += len(hits)
        c.misses[layer] += len(misses)
        pre = self.prefetched[layer]
        for e in hits:
            if pre[e]:
                c.prefetch_used[layer] += 1
                self._precision_update(pre[e], used=True)
                pre[e] = 0
        self.stats.record_access(layer, needed, self.now)
        self.needed_ema = 0.9 * self.needed_ema + 0.1 * len(needed)
        # Waves: the first holds every hit plus the misses that fit; the rest stream through the
        # slots that are neither pinned (static) nor in use by the wave.
        cap = self.layer_capacity[layer]
        n_pinned, n_pinned_needed = self._pinned_count(layer, needed) if self._pins else (0, 0)
        first_n = max(0, min(len(misses), cap - (n_pinned - n_pinned_needed) - len(hits)))
        groups = [hits + misses[:first_n]]
        rest = misses[first_n:]
        stream = max(1, cap - n_pinned)
        for i in range(0, len(rest), stream):
            groups.append(rest[i:i + stream])
        waves: list[Wave] = []
        for group in groups:
            protected = {row[e] for e in group if row[e] >= 0}
            loads = []
            for e in group:
                if row[e] >= 0:
                    continue
                ld = self._admit(layer, e, protected, prefetch=False, distance=0)
                if ld is None:  # cannot happen: a group never exceeds the partition
                    raise RuntimeError(f"no evictable slot for layer {layer} expert {e}")
                protected.add(ld.slot)
                loads.append(ld)
                c.demand_loads[layer] += 1
            waves.append(Wave(group, [row[e] for e in group], loads))
        return Route(layer, keep, new_w, needed, len(hits), len(misses), waves)

    def _pinned_count(self, layer: int, needed: list[int]) -> tuple[int, int]:
        """(pinned experts resident in `layer`'s partition, how many of them this visit needs)."""
        part = self.partitions[self.partition_of_layer[layer]]
        pin_row, row = self._pin_rows[layer], self.slot_of[layer]
        return part.pinned_occupants, sum(1 for e in needed if pin_row[e] and row[e] >= 0)

    # ---- prefetch -------------------------------------------------------------------------
    def effective_depth(self) -> int:
        """Lookahead for the next prefetch: fixed, or adaptive (Shen et al., 2510.26730):

            S = ceil(experts needed per layer x bytes per expert / (bandwidth x layer time))

        capped at `prefetch.depth`, then lowered while the precision of the deepest distance
        (EMA of used / issued) is below `min_precision`.
        """
        p = self.p
        d = p.prefetch_depth
        if d <= 0 or not p.prefetch_adaptive:
            return d
        if p.bandwidth_gbps and p.layer_time_ms and p.bytes_per_expert:
            copy_ms = self.needed_ema * p.bytes_per_expert / (p.bandwidth_gbps * 1e6)
            d = max(1, min(d, math.ceil(copy_ms / p.layer_time_ms)))
        while d > 1 and self.precision[d] < p.min_precision:
            d -= 1
        return d

    def prefetch(self, layer: int, predictions: np.ndarray | None,
                 current: Route | None = None) -> list[Load]:
        """Plan prefetches after visiting `layer`.

        predictions: [D, T, w] predicted expert ids for layers layer+1..layer+D (-1 = none),
        in the predictor's rank order per token.
        """
        p = self.p
        depth = self.effective_depth()
        if depth <= 0 or predictions is None:
            return []
        preds = np.asarray(predictions)
        width = p.prefetch_width or p.top_k
        loads: list[Load] = []
        c = self.counters
        same_part_current = None
        for dist in range(1, min(depth, preds.shape[0]) + 1):
            target = layer + dist
            if target >= p.num_layers:
                break
            cand = preds[dist - 1, :, :width]
            if cand.shape[0] == 1:  # decode: one token, already in rank order
                ranked = [e for e in dict.fromkeys(cand[0].tolist()) if e >= 0]
            else:  # rank by how many tokens predict the expert, then by first appearance
                flat = cand[cand >= 0]
                if flat.size == 0:
                    continue
                uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
                ranked = uniq[np.lexsort((first, -counts))].tolist()
            if not ranked:
                continue
            pred_row = self.stats.predicted[target]
            for e in ranked:
                pred_row[e] = True
            row = self.slot_of[target]
            protected = {row[e] for e in ranked if row[e] >= 0}
            if current is not None and self.partition_of_layer[current.layer] == self.partition_of_layer[target]:
                if same_part_current is None:
                    cur_row = self.slot_of[current.layer]
                    same_part_current = {cur_row[e] for e in current.needed if cur_row[e] >= 0}
                protected |= same_part_current
            for e in ranked:
                if row[e] >= 0:
                    continue
                ld = self._admit(target, e, protected, prefetch=True, distance=dist)
                if ld is None:
                    break
                protected.add(ld.slot)
                loads.append(ld)
                c.prefetch_issued[target] += 1
        return loads


_ALL_TRUE = {(t, k): np.ones((t, k), dtype=bool) for t in range(1, 9) for k in range(1, 17)}
