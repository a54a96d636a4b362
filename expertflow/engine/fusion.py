"""Fewer kernels per decode step: fusions applied while the graph engine is attached, reversibly.

At batch-1 decode the captured step is bound by kernel count, not bytes (each small kernel costs a
few microseconds). Each fusion keeps transformers' arithmetic and applies only where the module's
code is the standard one it replaces (checked by its source); anything else runs its own code.

* `FusedNorms`: transformers' RMSNorm is six kernels (cast, pow, mean, add + rsqrt, mul, cast +
  mul); each RMSNorm module whose forward is exactly that formula runs `kernels.rms_norm` (one).
* `FusedRotary`: `apply_rotary_pos_emb` (ten kernels for q and k) as one kernel
  (`fused_kernels.rotary`), swapped into the attention's modeling module only while the engine's
  own loop runs (`active()`), since a module global is shared by every model of that class.
* `FusedLinears` (fused_linear.py): sibling projections of one input as one GEMM, memory-neutral.
* `FusedBlocks` (fused_blocks.py): the gated MLP's silu * up, Qwen2-MoE's sigmoid-gated shared
  expert sum (with the residual add after it), and the decoder layer's residual add + RMSNorm,
  as one kernel each.
* The engine's own step: the experts kernel writes the step's routing record (ids, weights)
  itself (`record`), and the static KV cache writes keys and values in one kernel (`kv_write`).

`Fusions` applies them all (the Triton ones when the engine runs Triton kernels); the new ones
(all but FusedNorms) follow the engine's `fuse` flag and are off with EXPERTFLOW_ENGINE_FUSE=0
(or a subset of them on: see `fuse_enabled`).
`restore()` puts every forward, parameter and module global back.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch
from torch import nn

from . import fused_kernels, kernels
from .fused_blocks import FusedBlocks, source_is
from .fused_linear import FusedLinears

ENV_FUSE = "EXPERTFLOW_ENGINE_FUSE"

_FORMULA = ("hidden_states.pow(2).mean(-1, keepdim=True)",
            "hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
            "return self.weight * hidden_states.to(input_dtype)")


def is_standard_rms_norm(module: nn.Module) -> bool:
    if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        return False
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return all(part in src for part in _FORMULA)


class FusedNorms:
    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if is_standard_rms_norm(m)]
        for m in self.modules:
            m.forward = _fused_forward(m)

    def restore(self) -> None:
        for m in self.modules:
            del m.forward  # back to the class's forward
        self.modules = []


def _fused_forward(module: nn.Module):
    def forward(hidden_states):
        return kernels.rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return forward


# ---- rotary embedding ------------------------------------------------------------------------
_ROTATE_HALF = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""
_APPLY_ROTARY = """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
"""
_PATCHED: dict[object, list] = {}  # modeling module -> [its own apply_rotary_pos_emb, engines active]


def plain_function(fn):
    """The plain function under a hub-replaceable one. With the `kernels` package installed,
    transformers' `@use_kernel_forward_from_hub` turns a function into an nn.Module instance whose
    forward calls the original (kept in its closure as `func`) unless a hub kernel is active
    (kernels' private layout: tests/engine/test_fusion.py fails when it changes); else `fn`."""
    if isinstance(fn, nn.Module):
        fwd = getattr(type(fn), "forward", None)
        cells = dict(zip(getattr(getattr(fwd, "__code__", None), "co_freevars", ()), getattr(fwd, "__closure__", None) or ()))
        inner = cells["func"].cell_contents if "func" in cells else None
        return inner if inspect.isfunction(inner) else fn
    return fn


def standard_rotary_module(attn: nn.Module):
    """The modeling module of `attn` when its forward calls that module's standard
    apply_rotary_pos_emb (q * cos + rotate_half(q) * sin), else None."""
    mod = inspect.getmodule(type(attn))
    g = getattr(mod, "__dict__", {})
    fn = plain_function(_PATCHED[mod][0] if mod in _PATCHED else g.get("apply_rotary_pos_emb"))
    if fn is None or g.get("torch") is not torch or not source_is(fn, _APPLY_ROTARY):
        return None
    if not source_is(g.get("rotate_half"), _ROTATE_HALF):
        return None
    try:
        return mod if "apply_rotary_pos_emb(" in inspect.getsource(type(attn).forward) else None
    except (OSError, TypeError):
        return None


def _meta_strides(orig, q, k, cos, sin, unsqueeze_dim):
    """The output strides transformers' own function gives these inputs (run on meta tensors)."""
    def meta(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    try:
        qo, ko = orig(meta(q), meta(k), meta(cos), meta(sin), unsqueeze_dim)
    except (RuntimeError, TypeError, ValueError):
        return None
    return qo.stride(), ko.stride()


def _rotary(orig):
    layouts: dict[tuple, object] = {}

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        key = tuple((t.shape, t.stride(), t.dtype) for t in (q, k, cos, sin)) + (unsqueeze_dim,)
        if key not in layouts:
            layouts[key] = _meta_strides(orig, q, k, cos, sin, unsqueeze_dim)
        out = None if layouts[key] is None else fused_kernels.rotary(q, k, cos, sin, unsqueeze_dim, layouts[key])
        return orig(q, k, cos, sin, unsqueeze_dim) if out is None else out
    apply_rotary_pos_emb.expertflow_fused = orig
    return apply_rotary_pos_emb


class FusedRotary:
    def __init__(self, model: nn.Module):
        mods = {standard_rotary_module(m) for m in model.modules() if type(m).__name__.endswith("Attention")}
        self.modules = [m for m in mods if m is not None]

    @contextlib.contextmanager
    def active(self):
        for mod in self.modules:
            entry = _PATCHED.setdefault(mod, [mod.apply_rotary_pos_emb, 0])
            if entry[1] == 0:
                mod.apply_rotary_pos_emb = _rotary(entry[0])
            entry[1] += 1
        try:
            yield
        finally:
            for mod in self.modules:
                entry = _PATCHED[mod]
                entry[1] -= 1
                if entry[1] == 0:
                    mod.apply_rotary_pos_emb = entry[0]
                    del _PATCHED[mod]


# ---- all of them -----------------------------------------------------------------------------
FUSIONS = ("linear", "blocks", "rotary", "record", "kv")  # the new ones, by name


def fuse_enabled(fuse: bool = True) -> set[str]:
    """The new fusions to apply: all of FUSIONS with the engine's `fuse` flag, none without it;
    EXPERTFLOW_ENGINE_FUSE=0 (or false/no/off) turns them all off, and a comma-separated list of
    names (e.g. "rotary,blocks") keeps only those (per-fusion A/B on a GPU)."""
    env = os.environ.get(ENV_FUSE, "1").strip().lower()
    if not fuse or env in ("0", "false", "no", "off"):
        return set()
    if env in ("1", "true", "yes", "on", ""):
        return set(FUSIONS)
    names = {n.strip() for n in env.split(",") if n.strip()}
    unknown = names - set(FUSIONS)
    if unknown:
        raise ValueError(f"{ENV_FUSE}={env!r}: unknown fusion(s) {sorted(unknown)}; known: {', '.join(FUSIONS)}")
    return names


class Fusions:
    """Every fusion of one attached engine (see the module docstring)."""

    def __init__(self, model: nn.Module, *, triton: bool, on: set[str] | None = None):
        """`on`: the new fusions to apply (default: `fuse_enabled()`); without Triton only "linear"."""
        on = (fuse_enabled() if on is None else set(on)) & (set(FUSIONS) if triton else {"linear"})
        self.on = on
        self.norms = FusedNorms(model) if triton else None
        self.linears = FusedLinears(model) if "linear" in on else None
        self.blocks = FusedBlocks(model, is_standard_rms_norm) if "blocks" in on else None
        self.rotary = FusedRotary(model) if "rotary" in on else None
        self.record = "record" in on  # the experts kernel writes the step's routing record itself
        self.kv_write = fused_kernels.kv_write if "kv" in on else None  # for StaticKV

    def summary(self) -> dict[str, int]:
        """How many modules (groups, modeling modules) each fusion took."""
        return {"norms": len(self.norms.modules) if self.norms else 0,
                "linear_groups": len(self.linears.groups) if self.linears else 0,
                "linear_members": sum(len(g.members) for g in self.linears.groups) if self.linears else 0,
                "blocks": len(self.blocks.modules) if self.blocks else 0,
                "rotary_modules": len(self.rotary.modules) if self.rotary else 0}

    def active(self):
        """Context for the engine's own loop (the module-global swaps live only inside it)."""
        return self.rotary.active() if self.rotary else contextlib.nullcontext()

    def restore(self) -> None:
        for f in (self.norms, self.linears, self.blocks):
            if f is not None:
                f.restore()
        self.norms = self.linears = self.blocks = self.rotary = None
