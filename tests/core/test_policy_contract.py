"""One contract suite run against every registered eviction policy, plus each policy's meaning."""

import numpy as np
import pytest

from expertflow.core import Scheduler, SchedulerParams, policy_names

POLICIES = policy_names()


def make(policy, L=3, E=8, k=2, capacity=9, scope="per_layer", depth=0, **kw):
    rng = np.random.default_rng(1)
    priors = tuple(tuple(r) for r in rng.random((L, E)))
    return Scheduler(SchedulerParams(num_layers=L, num_experts=E, top_k=k, capacity=capacity,
                                     scope=scope, policy=policy, priors=priors,
                                     prefetch_depth=depth, **kw))


def random_steps(n, L, E, k, T=1, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(E) * 0.5, size=L)
    for _ in range(n):
        for m in range(L):
            ids = np.stack([rng.choice(E, k, replace=False, p=p[m]) for _ in range(T)])
            yield m, ids, np.sort(rng.random((T, k)).astype(np.float32))[:, ::-1].copy()


def check_invariants(s: Scheduler):
    seen = {}
    for part in s.partitions:
        occ = part.layer >= 0
        assert occ.sum() + len(part.free) == part.capacity
        for li in np.flatnonzero(occ):
            key = (int(part.layer[li]), int(part.expert[li]))
            assert key not in seen, "an expert holds two slots"
            seen[key] = part.slots[li]
            assert s.slot_of[key[0]][key[1]] == part.slots[li]
    resident = sum(1 for row in s.slot_of for v in row if v >= 0)
    assert resident == len(seen) <= s.num_slots


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scope", ["per_layer", "pooled"])
@pytest.mark.parametrize("T", [1, 5])
def test_contract(policy, scope, T):
    s = make(policy, scope=scope, depth=2)
    rng = np.random.default_rng(3)
    for m, ids, w in random_steps(40, 3, 8, 2, T=T):
        before = {(l, e) for l in range(3) for e in range(8) if s.slot_of[l][e] >= 0}
        r = s.route(m, ids, w)
        needed = sorted(set(ids.ravel().tolist()))
        assert r.needed == needed and r.hits + r.misses == len(needed)
        assert r.hits == len([e for e in needed if (m, e) in before])
        covered = [e for wave in r.waves for e in wave.experts]
        assert sorted(covered) == needed, "every needed expert is computed exactly once"
        for wave in r.waves:
            slots = [ld.slot for ld in wave.loads]
            assert len(set(wave.slots)) == len(wave.slots)
            assert set(slots) <= set(wave.slots)
            for ld in wave.loads:
                assert ld.evicted is None or ld.evicted not in {(m, e) for e in wave.experts}
        pinned = s.pinned_mask
        for ld in r.loads:
            if ld.evicted is not None and pinned is not None:
                assert not pinned[ld.evicted], "a pinned expert was evicted"
        check_invariants(s)
        preds = rng.integers(0, 8, size=(2, T, 2))
        for ld in s.prefetch(m, preds, r):
            assert ld.prefetch and ld.layer > m
            if scope == "pooled":
                assert ld.evicted not in {(m, e) for e in r.needed}, "prefetch evicted a current expert"
        check_invariants(s)
    t = s.counters.totals()
    assert t["prefetch_used"] + t["prefetch_wasted"] <= t["prefetch_issued"]


@pytest.mark.parametrize("policy", POLICIES)
def test_deterministic(policy):
    def run():
        s = make(policy, depth=1)
        out = []
        for m, ids, w in random_steps(30, 3, 8, 2, seed=5):
            r = s.route(m, ids, w)
            out.append([(ld.expert, ld.slot, ld.evicted) for ld in r.loads])
            out.append([(ld.layer, ld.expert) for ld in s.prefetch(m, ids[None, :, ::-1], r)])
        return out, s.counters.decision_counts()

    assert run() == run()


@pytest.mark.parametrize("policy", POLICIES)
def test_capacity_smaller_than_need_streams_in_waves(policy):
    s = make(policy, L=1, E=8, k=4, capacity=1)
    ids = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    r = s.route(0, ids, np.ones((2, 4), np.float32))
    assert len(r.waves) == 8 and all(len(w.experts) == 1 for w in r.waves)
    check_invariants(s)


def test_lru_evicts_least_recently_used():
    s = make("lru", L=1, E=8, capacity=3, warm_start=False)
    for e in (0, 1, 2):
        s.route(0, np.array([[e]]), np.ones((1, 1), np.float32))
    s.route(0, np.array([[0]]), np.ones((1, 1), np.float32))  # 1 is now the oldest
    r = s.route(0, np.array([[5]]), np.ones((1, 1), np.float32))
    assert r.loads[0].evicted == (0, 1)


def test_lfu_evicts_least_frequently_used():
    s = make("lfu", L=1, E=8, capacity=3, warm_start=False)
    for e in (0, 0, 0, 1, 2, 2):
        s.route(0, np.array([[e]]), np.ones((1, 1), np.float32))
    r = s.route(0, np.array([[5]]), np.ones((1, 1), np.float32))
    assert r.loads[0].evicted == (0, 1)


def test_static_pins_the_hottest_and_never_evicts_them():
    priors = ((0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0),)
    s = Scheduler(SchedulerParams(num_layers=1, num_experts=8, top_k=1, capacity=4, policy="static",
                                  priors=priors))
    assert s.pinned_mask[0].tolist()[:3] == [True, True, True] and s.pinned_mask.sum() == 3
    s.warm_start_loads()
    for e in (4, 5, 6, 7, 4, 5):
        r = s.route(0, np.array([[e]]), np.ones((1, 1), np.float32))
        for ld in r.loads:
            assert ld.evicted is None or ld.evicted[1] >= 3


def test_expertflow_keeps_predicted_experts():
    s = make("expertflow", L=2, E=8, capacity=4, warm_start=False, prediction_bonus=5.0, depth=1)
    for e in (0, 1):
        s.route(1, np.array([[e]]), np.ones((1, 1), np.float32))
    r = s.route(0, np.array([[3]]), np.ones((1, 1), np.float32))
    s.prefetch(0, np.array([[[0]]]), r)  # layer 1's expert 0 is predicted
    r1 = s.route(1, np.array([[7]]), np.ones((1, 1), np.float32))  # needs a victim in layer 1
    assert r1.loads[0].evicted == (1, 1)


def test_demand_allocation_gives_flat_layers_more_slots():
    skewed = [1.0] + [0.0] * 7
    flat = [1.0] * 8
    s = Scheduler(SchedulerParams(num_layers=2, num_experts=8, top_k=1, capacity=8,
                                  allocation="demand", priors=(tuple(skewed), tuple(flat))))
    assert s.layer_capacity[0] == 1 and s.layer_capacity[1] == 7
