"""The memory budget as a hard cap on this process's CUDA caching allocator, while attached.

The budget (expertflow.budget) sizes the slot pool so that the model fits; what the caching
allocator keeps reserved on top (freed blocks cached per stream, a graph's private pool, warm-up
temporaries) is not in that sum and can push reserved memory over the budget (H200, 2026-12-03:
0.5-1.3 GB over at 8-24GB). `torch.cuda.set_per_process_memory_fraction` makes the allocator free
its cached blocks and retry before it would reserve past the cap, so reserved memory stays within
it, or an allocation fails with torch's OutOfMemoryError naming the cap.

Several engines attached at once on one device share one cap, the sum of their budgets; the
fraction the process had before the first one is restored when the last one detaches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import BudgetError

_ACTIVE: dict[int, list[int]] = {}   # device index -> budgets of the engines attached there
_BEFORE: dict[int, float] = {}       # device index -> the process's fraction before the first


def _apply(idx: int) -> None:
    total = torch.cuda.get_device_properties(idx).total_memory
    budgets = _ACTIVE.get(idx)
    if budgets:
        torch.cuda.set_per_process_memory_fraction(min(1.0, sum(budgets) / total), idx)
    else:
        torch.cuda.set_per_process_memory_fraction(_BEFORE.pop(idx, 1.0), idx)
        _ACTIVE.pop(idx, None)


class AllocatorCap:
    """Hold the cap for one engine: `AllocatorCap(device, budget_bytes)`, then `.release()`."""

    def __init__(self, device: torch.device, budget_bytes: int):
        self.idx = device.index if device.index is not None else torch.cuda.current_device()
        self.budget_bytes = int(budget_bytes)
        if self.idx not in _ACTIVE:
            _BEFORE[self.idx] = torch.cuda.get_per_process_memory_fraction(self.idx)
            _ACTIVE[self.idx] = []
        _ACTIVE[self.idx].append(self.budget_bytes)
        self.held = True
        _apply(self.idx)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _ACTIVE[self.idx].remove(self.budget_bytes)
        _apply(self.idx)


def over_budget(config, slots: int, device, exc: BaseException) -> BudgetError:
    """The one-line error for an engine that does not fit its budget under the cap."""
    m = config.memory
    return BudgetError(f"the graph engine does not fit the memory budget {m.budget_text} ({m.budget_bytes / 1e9:.2f} "
                       f"GB, {slots} expert slots) on {device}: {str(exc).splitlines()[0]} Use a larger "
                       "budget, fewer slots (cache.capacity_experts), or memory.enforce_budget: false")


@contextlib.contextmanager
def budget_errors(cap: AllocatorCap | None, config, slots: int, device) -> Iterator[None]:
    """Under the cap, an allocation the budget does not hold is the one-line BudgetError (exit 5)
    instead of torch's OutOfMemoryError; without a cap, torch's error as it is."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if cap is None:
            raise
        raise over_budget(config, slots, device, exc) from exc
