"""The fence around transformers' private names (expertflow/runtime/backend.py).

ExpertFlow plugs into transformers through a handful of names that are not a documented API:
the experts-backend registry, the fused experts modules' attributes and their un-decorated
forward, the batched_mm / grouped_mm kernels and their signature. Each is checked here on every
supported architecture, so a transformers release that moves one fails this test (with the name)
instead of a user's run."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from packaging.version import Version

from expertflow.registry import resolve_model
from expertflow.runtime.adapters import find_moe_blocks
from expertflow.runtime.backend import (BACKEND_NAME, PoolKernels, _PoolView, experts_implementation,
                                        register_backend, restore_experts_implementation)
from expertflow.runtime.loading import build_model
from expertflow.runtime.store import HostStore, SlotPool

ARCHS = ["tiny-qwen2-moe", "tiny-mixtral", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v2"]


def test_transformers_is_a_supported_release():
    v = Version(transformers.__version__)
    assert Version("5.17") <= v < Version("6"), v  # pyproject.toml's range


def test_the_experts_registry_and_kernels_exist_with_their_signatures():
    from transformers.integrations import moe

    register_backend()
    assert BACKEND_NAME in moe.ExpertsInterface._global_mapping
    for name in ("batched_mm_experts_forward", "grouped_mm_experts_forward"):
        params = list(inspect.signature(getattr(moe, name)).parameters)
        assert params[:4] == ["self", "hidden_states", "top_k_index", "top_k_weights"], (name, params)


@pytest.mark.parametrize("name", ARCHS)
def test_each_architectures_experts_module_has_what_the_pool_view_copies(name):
    model = build_model(resolve_model(name), device="cpu", dtype="float32", seed=0)
    experts = find_moe_blocks(model)[0].experts
    for attr in ("gate_up_proj", "down_proj", "num_experts", "config", "act_fn", "_apply_gate"):
        assert hasattr(experts, attr), (name, attr)
    fwd = type(experts).forward
    assert hasattr(fwd, "__wrapped__"), name  # the eager kernel: the forward under its backend switch
    assert list(inspect.signature(fwd.__wrapped__).parameters)[:4] == \
        ["self", "hidden_states", "top_k_index", "top_k_weights"], name
    prev = experts_implementation(model)
    model.set_experts_implementation("batched_mm")
    restore_experts_implementation(model, prev)
    assert experts_implementation(model) == prev, name


@pytest.mark.parametrize("name", ARCHS)
def test_pool_kernels_equal_the_modules_own_backend(name):
    """Every transformers kernel over a pool holding the layer's experts in order gives what the
    experts module itself computes with that backend."""
    model = build_model(resolve_model(name), device="cpu", dtype="float32", seed=0)
    blocks = find_moe_blocks(model)
    experts = blocks[0].experts
    E, k, H = int(experts.num_experts), 2, experts.gate_up_proj.shape[-1]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(5)])
    w = torch.rand(5, k, generator=g)
    refs = {}
    for backend in ("batched_mm", "grouped_mm", "eager"):
        model.set_experts_implementation(backend)
        with torch.no_grad():
            refs[backend] = experts(h, ids, w)
    store = HostStore(blocks, False, object())
    try:
        pool = SlotPool(store, E * len(blocks), torch.device("cpu"))
        for e in range(E):
            pool.fill(store, 0, e, e)  # layer 0's experts in slots 0..E-1
        for backend in ("batched_mm", "grouped_mm", "eager"):
            kern = PoolKernels(blocks, pool, torch.device("cpu"), backend)
            assert isinstance(kern.views[0], _PoolView)
            with torch.no_grad():
                out = kern.run(0, h, ids.numpy(), w)
            assert torch.allclose(out, refs[backend], atol=1e-6, rtol=1e-5), (name, backend)
    finally:
        store.restore()
