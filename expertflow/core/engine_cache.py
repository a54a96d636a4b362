"""The graph engine's expert-cache decisions, made one step behind the GPU (torch-free).

The graph engine (expertflow.engine) replays a captured decode step per token. Routed experts
are read through a device table (layer, expert) -> address that points into the GPU slot pool
(a hit) or into the pinned host store (a miss, read zero-copy). The host never waits on a step
it is deciding for: it reads step n's routed ids after step n+1 has been launched, decides, and
its table changes reach the GPU in stream order before step n+2.

Read-through admission: each layer keeps `staging` free slots per step parity (two sets, because
step n+1 runs while the host decides step n). The kernel that reads step n's missed experts from
the host also writes them into the free slots of set n % 2, r-th missed expert (ascending id,
kept experts only) into the r-th slot; admitting them afterwards costs no second PCIe transfer.
Deciding step n then
 1. counts hits and misses against the table that step n ran with: the state before the host
    decided step n-1 for a decode step (it was launched before that decision), the current one
    for a prefill step (the engine drains before a prefill);
 2. admits each of step n's written misses that is still not resident into its staging slot;
 3. refills staging set n % 2 from the free slots while there are any (a cold cache grows),
    then by evicting the policy's victims (never an expert step n used):
    a victim's entry points back to the host now, and its slot is written again two steps later,
    after every step that could still read it has finished.

The simulator (tuner.simulator.simulate_engine) replays a trace through this same class, so
the engine and the simulator agree on every hit, miss, admission and eviction.

Shape legend: L = MoE layers, E = experts per layer, T = tokens in the step, k = router top-k,
R = staging slots per layer and parity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .plan import SchedulerParams
from .scheduler import Scheduler

PREFILL_STEP, DECODE_STEP = 0, 1  # the same codes as expertflow.trace.PREFILL / DECODE


@dataclass
class StepPlan:
    """What the host changes after deciding one step (the engine applies it in stream order)."""

    step: int
    entries: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) -> slot or -1
    admitted: int = 0
    evicted: int = 0
    hits: int = 0
    misses: int = 0


def staging_ranks(ids: np.ndarray, resident) -> list[tuple[int, int]]:
    """(expert, rank) of a step's distinct kept experts that are not resident, ascending ids:
    the r-th is the one the kernel writes into staging slot r. ids [T, k] (-1 = dropped);
    resident[e] says whether expert e is in a GPU slot in the table the step ran with."""
    missed = sorted({int(e) for e in np.asarray(ids).ravel() if e >= 0 and not resident[int(e)]})
    return [(e, r) for r, e in enumerate(missed)]


def staging_per_layer(capacity: int, staging: int, layers_sharing: int = 1) -> int:
    """Staging slots per layer and parity that a partition of `capacity` slots can give while
    keeping at least one live slot per layer: min(staging, (capacity - layers) // (2 x layers))."""
    if staging <= 0 or capacity <= layers_sharing:
        return 0
    return max(0, min(staging, (capacity - layers_sharing) // (2 * layers_sharing)))


class EngineScheduler(Scheduler):
    """One-step-behind cache decisions of the graph engine; see the module docstring.

    Reuses the Scheduler's partitions, eviction policies, access statistics and counters (one
    implementation of each decision); only admission differs (read-through into staging slots
    instead of demand loads). Prefetch planning is not used by the engine.
    """

    def __init__(self, params: SchedulerParams, staging: int):
        super().__init__(params)
        L = params.num_layers
        self.stage: list[list[list[int]]] = [[[], []] for _ in range(L)]  # [layer][parity] -> slots
        self.staging = []  # staging slots per layer and parity, after the partition's limits
        for layer in range(L):
            part = self.partitions[self.partition_of_layer[layer]]
            sharing = len(self._layers_of(self.partition_of_layer[layer]))
            self.staging.append(staging_per_layer(part.capacity, staging, sharing))
        for layer in range(L):  # staging slots come out of the free stack first
            part = self.partitions[self.partition_of_layer[layer]]
            for parity in (0, 1):
                for _ in range(self.staging[layer]):
                    self.stage[layer][parity].append(part.slots[part.free.pop()])
        self.step = 0  # steps decided so far (the next step to decide)
        self.decode = {"steps": 0, "tokens": 0, "hits": 0, "misses": 0, "admitted": 0}  # decode steps only
        self._last: dict[tuple[int, int], int] = {}  # entries the previous decision changed: old slot

    # ---- what the GPU sees ----------------------------------------------------------------
    def table(self) -> np.ndarray:
        """[L, E] int64: the slot of each resident expert, -1 for the host."""
        return np.asarray(self.slot_of, dtype=np.int64)

    def stage_table(self, step: int) -> np.ndarray:
        """[L, max R] int64: staging slots step `step` writes its misses into, -1 = none."""
        width = max(self.staging) if self.staging else 0
        out = np.full((self.p.num_layers, max(width, 1)), -1, dtype=np.int64)
        for layer, sets in enumerate(self.stage):
            slots = sets[step % 2]
            out[layer, :len(slots)] = slots
        return out

    def _seen(self, layer: int, expert: int, kind: int) -> int:
        """The slot the GPU read (layer, expert) from in the step being decided (-1 = host)."""
        if kind == DECODE_STEP:
            old = self._last.get((layer, expert))
            if old is not None:
                return old
        return self.slot_of[layer][expert]

    # ---- one step -------------------------------------------------------------------------
    def decide(self, ids: np.ndarray, weights: np.ndarray | None = None, kind: int = DECODE_STEP,
               dropped: np.ndarray | None = None) -> StepPlan:
        """Decide step `self.step` from its routed ids [L, T, k] (-1 = dropped by adaptive-k).

        weights [L, T, k] (optional) feed the dropped-mass counter; `dropped` [L] gives the
        summed dropped gate share per layer directly instead.
        """
        ids = np.asarray(ids)
        L = self.p.num_layers
        c = self.counters
        parity = self.step % 2
        plan = StepPlan(self.step)
        changed: dict[tuple[int, int], int] = {}
        needed_all = []
        for layer in range(L):
            row = ids[layer]
            kept = row[row >= 0]
            needed_all.append(sorted(set(kept.tolist())))
        for layer in range(L):
            self.now += 1
            needed = needed_all[layer]
            row = ids[layer]
            T = row.shape[0]
            c.steps[layer] += 1
            c.tokens[layer] += T
            c.activated[layer] += int((row >= 0).sum())
            c.unique_needed[layer] += len(needed)
            if dropped is not None:
                c.dropped_mass[layer] += float(dropped[layer])
            elif weights is not None:
                w = np.asarray(weights[layer], dtype=np.float64)
                total = w.sum(axis=1)
                kept_w = np.where(row >= 0, w, 0.0).sum(axis=1)
                c.dropped_mass[layer] += float(np.divide(total - kept_w, total, out=np.zeros_like(total),
                                                         where=total > 0).sum())
            misses = [e for e in needed if self._seen(layer, e, kind) < 0]
            c.hits[layer] += len(needed) - len(misses)
            c.misses[layer] += len(misses)
            plan.hits += len(needed) - len(misses)
            plan.misses += len(misses)
            self.stats.record_access(layer, needed, self.now)
            # 2. admit the misses the kernel wrote into this parity's staging slots
            stage = self.stage[layer][parity]
            used = []
            for r, e in enumerate(misses[:len(stage)]):
                if self.slot_of[layer][e] >= 0:
                    continue  # admitted by the previous decision already (it missed twice)
                slot = stage[r]
                self._place(layer, e, slot)
                changed.setdefault((layer, e), -1)
                plan.entries[(layer, e)] = slot
                used.append(slot)
                c.demand_loads[layer] += 1
                plan.admitted += 1
            if used:
                self.stage[layer][parity] = [s for s in stage if s not in used]
        # 3. refill every layer's staging set of this parity (after all admissions, so a layer's
        #    victim is never an expert this step needed in any layer)
        protected = {(layer, e) for layer in range(L) for e in needed_all[layer]}
        self._refill(parity, protected, plan, changed)
        self._last = changed
        self.step += 1
        if kind == DECODE_STEP:
            d = self.decode
            d["steps"] += 1
            d["tokens"] += int(ids.shape[1])
            d["admitted"] += plan.admitted
            d["hits"] += plan.hits
            d["misses"] += plan.misses
        return plan

    def _refill(self, parity: int, protected: set, plan: StepPlan, changed: dict) -> None:
        """Refill every layer's staging set of `parity`: free slots first, then the policy's
        victims (never an expert in `protected`, the step's own)."""
        L = self.p.num_layers
        for layer in range(L):
            want = self.staging[layer] - len(self.stage[layer][parity])
            part = self.partitions[self.partition_of_layer[layer]]
            for _ in range(want):
                if part.free:  # a cold cache (no warm start) grows into its free slots first
                    self.stage[layer][parity].append(part.slots[part.free.pop()])
                    continue
                victim = self._victim(layer, protected)
                if victim is None:
                    break
                ev_l, ev_e, slot = victim
                changed.setdefault((ev_l, ev_e), slot)
                plan.entries[(ev_l, ev_e)] = -1
                self.stage[layer][parity].append(slot)
                plan.evicted += 1


    def _place(self, layer: int, expert: int, slot: int) -> None:
        part = self.partitions[self.partition_of_layer[layer]]
        local = part.local_of[slot]
        part.layer[local] = layer
        part.expert[local] = expert
        self.slot_of[layer][expert] = slot
        if self._pins and self._pin_rows[layer][expert]:
            part.pinned_occupants += 1

    def _victim(self, layer: int, protected: set[tuple[int, int]]) -> tuple[int, int, int] | None:
        """Evict the policy's lowest-scored live expert of `layer`'s partition (not protected,
        not pinned); returns (layer, expert, freed slot) or None."""
        part = self.partitions[self.partition_of_layer[layer]]
        live = np.flatnonzero(part.layer >= 0)
        if live.size == 0:
            return None
        lay, exp = part.layer[live], part.expert[live]
        scores = self.policy.scores(lay, exp, self.now).astype(np.float64)
        if self._pins:
            scores[self.policy.pinned(lay, exp)] = np.inf
        for i in range(live.size):
            if (int(lay[i]), int(exp[i])) in protected:
                scores[i] = np.inf
        i = int(np.argmin(scores))
        if scores[i] == np.inf:
            return None
        local = int(live[i])
        ev_l, ev_e = int(part.layer[local]), int(part.expert[local])
        part.layer[local] = -1
        part.expert[local] = -1
        self.slot_of[ev_l][ev_e] = -1
        self.counters.evictions[ev_l] += 1
        return ev_l, ev_e, part.slots[local]
