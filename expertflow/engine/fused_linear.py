"""Sibling projections of one input as one GEMM, memory-neutral and reversible.

At batch-1 decode each projection is its own GEMV kernel. Projections that read the same tensor
(an attention's q/k/v; a gated MLP's gate/up; Qwen2-MoE's shared expert gate/up, router and
shared-expert gate) are concatenated into one weight [sum of outputs, in], and every original
parameter is re-pointed (`param.data = view`) at its rows of it: the parameters stay the same
objects, and no second copy of any weight exists. The first sibling called with an input computes
the one GEMM (bias concatenated the same way); the others, called with the same tensor (same
address, shape, strides, dtype and version: a view of it counts), return their slice of its
output, a view. The cached output is dropped once every sibling has taken its slice. Pure tensor
ops and Python bookkeeping: no host sync, so it is captured in a CUDA graph like the rest.

A router that is not an nn.Linear (`F.linear(hidden_states, self.weight)` inside its forward) joins
through a TorchFunctionMode around its own forward that answers that one call with its slice.

`restore()` gives every parameter its own storage again (a clone of its rows) and puts every
forward back.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_QKV = (("q_proj", "k_proj", "v_proj"), ("q_proj", "kv_a_proj_with_mqa"), ("q_a_proj", "kv_a_proj_with_mqa"))
_ROUTER_CALL = "F.linear(hidden_states, self.weight)"


def _key(x: torch.Tensor) -> tuple:
    """What makes two tensors the same input: address, layout and version (an inference tensor
    has no version counter: there address and layout decide; in the layouts fused here nothing
    writes a projection's input between its siblings' calls)."""
    version = -1 if x.is_inference() else x._version
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, version)


class LinearGroup:
    """One GEMM for `members` (modules with .weight [out, in] and maybe .bias) fed one input."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self.params = [m.weight for m in members]
        self.biases = [m.bias for m in members] if members[0].bias is not None else []
        with torch.no_grad():
            self.weight = torch.cat([p.detach() for p in self.params])
            self.bias = torch.cat([b.detach() for b in self.biases]) if self.biases else None
        self.bounds = []
        a = 0
        for p in self.params:
            self.bounds.append((a, a + p.shape[0]))
            a += p.shape[0]
        for i, (lo, hi) in enumerate(self.bounds):
            self.params[i].data = self.weight[lo:hi]
            if self.biases:
                self.biases[i].data = self.bias[lo:hi]
        self._clear()

    def _clear(self) -> None:
        self._x = self._y = self._k = None
        self._served: set[int] = set()

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member i's projection of x: its slice of the group's GEMM over x."""
        k = _key(x)
        if k != self._k or i in self._served:
            self._y = F.linear(x, self.weight, self.bias)
            self._x, self._k, self._served = x, k, set()  # x held: its memory cannot be reused meanwhile
        lo, hi = self.bounds[i]
        out = self._y[..., lo:hi]
        self._served.add(i)
        if len(self._served) == len(self.members):
            self._clear()
        return out

    def restore(self) -> None:
        with torch.no_grad():
            for p in self.params + self.biases:
                p.data = p.data.clone()
        for m in self.members:
            m.__dict__.pop("forward", None)
        self._clear()
        self.weight = self.bias = None


class _AnswerLinear(TorchFunctionMode):
    """Inside a router's forward: F.linear(x, weight) with that weight answered by `serve(x)`."""

    def __init__(self, weight: torch.Tensor, serve):
        super().__init__()
        self.weight, self.serve = weight, serve

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) == 2 and args[1] is self.weight and kwargs.get("bias") is None:
            return self.serve(args[0])
        return func(*args, **kwargs)


def _linear_forward(group: LinearGroup, i: int):
    def forward(x):
        return group.output(i, x)
    return forward


def _router_forward(group: LinearGroup, i: int, router: nn.Module):
    cls_forward = type(router).forward

    def forward(*args, **kwargs):
        with _AnswerLinear(router.weight, lambda x: group.output(i, x)):
            return cls_forward(router, *args, **kwargs)
    return forward


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and "forward" not in m.__dict__


def is_standard_router(m) -> bool:
    """A router whose forward computes its logits as F.linear(hidden_states, self.weight)."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear) or not isinstance(w, nn.Parameter) or w.dim() != 2 or "forward" in m.__dict__:
        return False
    if getattr(m, "bias", None) is not None:
        return False
    try:
        src = inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return False
    return _ROUTER_CALL in src and inspect.getmodule(type(m)).__dict__.get("F") is F


def _compatible(members) -> bool:
    ws = [m.weight for m in members]
    if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1 or any(not w.is_contiguous() for w in ws):
        return False
    has_bias = {getattr(m, "bias", None) is not None for m in members}
    return len(has_bias) == 1


def find_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The sibling sets fed one input, by the standard module names (see the module docstring)."""
    groups, taken = [], set()

    def add(ms) -> None:
        if all(m is not None for m in ms) and not taken & {id(m) for m in ms} and _compatible(ms):
            groups.append(ms)
            taken.update(id(m) for m in ms)

    for parent in model.modules():  # a parent comes before its children
        # Qwen2-MoE: the shared expert's gate/up, the router and the shared-expert gate read one tensor
        shared, router, seg = (getattr(parent, n, None) for n in ("shared_expert", "gate", "shared_expert_gate"))
        if shared is not None and is_standard_router(router) and _plain_linear(seg) and seg.out_features == 1:
            gate_up = [getattr(shared, "gate_proj", None), getattr(shared, "up_proj", None)]
            if all(_plain_linear(m) for m in gate_up):
                add(gate_up + [router, seg])
        for names in _QKV:
            ms = [getattr(parent, n, None) for n in names]
            if all(_plain_linear(m) for m in ms):
                add(ms)
        ms = [getattr(parent, "gate_proj", None), getattr(parent, "up_proj", None)]
        if all(_plain_linear(m) for m in ms):
            add(ms)
    return groups


class FusedLinears:
    def __init__(self, model: nn.Module):
        self.groups = []
        for members in find_groups(model):
            group = LinearGroup(members)
            for i, m in enumerate(members):
                m.forward = _linear_forward(group, i) if isinstance(m, nn.Linear) else _router_forward(group, i, m)
            self.groups.append(group)
        if any(g.weight.is_cuda for g in self.groups):
            torch.cuda.empty_cache()  # the members' old storages, freed one group at a time

    def restore(self) -> None:
        for g in self.groups:
            g.restore()
        self.groups = []
