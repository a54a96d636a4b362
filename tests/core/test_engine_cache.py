"""The graph engine's one-step-behind decisions (expertflow.core.engine_cache) on hand cases."""

import numpy as np

from expertflow.core import SchedulerParams
from expertflow.core.engine_cache import EngineScheduler


def test_cold_cache_grows_into_its_free_slots():
    """No warm start: every read-through admission must keep its slot while free slots remain
    (the refill takes a free slot before it evicts anyone), so after a step per expert the cache
    holds every expert it has room for."""
    E, cap = 8, 8
    sched = EngineScheduler(SchedulerParams(num_layers=1, num_experts=E, top_k=1, capacity=cap, policy="lru",
                                            warm_start=False), 1)
    live = cap - 2  # one staging slot per step parity stays free for the next misses
    for step in range(2 * E):
        sched.decide(np.array([[[step % live]]]), np.ones((1, 1, 1)))
    resident = int((sched.table() >= 0).sum())
    assert resident == live
    assert sum(sched.counters.evictions) == 0
    # once every expert seen is resident, the routing hits
    before = sum(sched.counters.misses)
    for step in range(3):
        sched.decide(np.array([[[step]]]), np.ones((1, 1, 1)))
    assert sum(sched.counters.misses) == before
