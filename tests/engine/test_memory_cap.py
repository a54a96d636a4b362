"""The budget as a cap on the CUDA caching allocator (expertflow.engine.memory_cap).

On CPU: the cap's bookkeeping against a stand-in for torch.cuda's fraction calls (engines
attached together share the sum of their budgets; the process's own fraction comes back after the
last one). On a GPU (marked gpu): a budget too small for the engine is a BudgetError that leaves
the model as it was, and the engine's peak reserved memory stays within the budget."""

from types import SimpleNamespace

import pytest
import torch

from expertflow.engine import memory_cap

TOTAL = 100_000


@pytest.fixture
def fake_cuda(monkeypatch):
    state = {"fraction": {0: 0.9, 1: 1.0}, "calls": []}

    def set_fraction(f, idx):
        state["fraction"][idx] = f
        state["calls"].append((idx, f))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda idx: state["fraction"][idx])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda idx: SimpleNamespace(total_memory=TOTAL))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(memory_cap, "_ACTIVE", {})
    monkeypatch.setattr(memory_cap, "_BEFORE", {})
    return state


def test_one_cap_then_the_process_fraction_again(fake_cuda):
    cap = memory_cap.AllocatorCap(torch.device("cuda", 0), 25_000)
    assert fake_cuda["fraction"][0] == pytest.approx(0.25)
    cap.release()
    assert fake_cuda["fraction"][0] == pytest.approx(0.9)  # what the process had set itself
    cap.release()  # twice is harmless
    assert fake_cuda["fraction"][0] == pytest.approx(0.9)


def test_engines_together_share_the_sum_and_devices_are_separate(fake_cuda):
    a = memory_cap.AllocatorCap(torch.device("cuda"), 20_000)  # no index: the current device
    b = memory_cap.AllocatorCap(torch.device("cuda", 0), 30_000)
    c = memory_cap.AllocatorCap(torch.device("cuda", 1), 10_000)
    assert fake_cuda["fraction"][0] == pytest.approx(0.5)
    assert fake_cuda["fraction"][1] == pytest.approx(0.1)
    a.release()
    assert fake_cuda["fraction"][0] == pytest.approx(0.3)
    b.release()
    assert fake_cuda["fraction"][0] == pytest.approx(0.9)
    assert fake_cuda["fraction"][1] == pytest.approx(0.1)
    c.release()
    assert fake_cuda["fraction"][1] == pytest.approx(1.0)


def test_a_budget_over_the_card_caps_at_the_card(fake_cuda):
    cap = memory_cap.AllocatorCap(torch.device("cuda", 0), 3 * TOTAL)
    assert fake_cuda["fraction"][0] == pytest.approx(1.0)
    cap.release()


def test_an_allocation_over_the_capped_budget_is_a_budget_error(tiny_config):
    from expertflow.errors import BudgetError

    cfg = tiny_config("tiny-qwen2-moe")
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
    cap = object()  # any held cap
    with pytest.raises(BudgetError) as info:
        with memory_cap.budget_errors(cap, cfg, 12, torch.device("cuda", 0)):
            raise oom
    msg = str(info.value)
    assert "\n" not in msg and cfg.memory.budget_text in msg and "12 expert slots" in msg
    assert "Tried to allocate 2.00 GiB" in msg and "memory.enforce_budget: false" in msg
    with pytest.raises(torch.OutOfMemoryError):  # without a cap: torch's own error
        with memory_cap.budget_errors(None, cfg, 12, torch.device("cuda", 0)):
            raise oom


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_within_budget_and_a_budget_too_small_is_a_budget_error():
    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.engine import attach
    from expertflow.errors import BudgetError
    from expertflow.registry import resolve_model
    from expertflow.runtime.loading import build_model

    spec = resolve_model("qwen2-moe")
    model = build_model(spec, device="cuda", dtype="bfloat16", seed=0, experts_on_host=True)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    ids = torch.randint(0, spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    plan = plan_memory(spec, "8GB")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with attach(model, default_config(spec, plan), device="cuda") as eng:
        eng.generate(ids, 64)
    assert torch.cuda.max_memory_reserved() <= plan.budget_bytes, torch.cuda.max_memory_reserved()
    # a budget the non-expert part alone overflows once the pool is sized for 8GB
    small = default_config(spec, plan).with_values({"memory.budget_bytes": 5_000_000_000, "memory.budget_text": "5GB"})
    with pytest.raises(BudgetError, match="5GB"):
        attach(model, small, device="cuda")
    assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(1.0)
    after = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
