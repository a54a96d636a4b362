"""Module forwards whose elementwise tails run as one Triton kernel (reversible, per instance).

* A gated MLP whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU
  act_fn: `silu(g) * u` is one kernel (`fused_kernels.silu_mul`) instead of two.
* Qwen2-MoE's sparse block whose forward is exactly transformers' (shared expert, router,
  experts, `sigmoid(shared_expert_gate(x)) * shared + experts`): the gate's sigmoid, the product
  and the sum are one kernel (`fused_kernels.gated_add`) instead of three.

"Exactly" is checked on the syntax tree of the class's forward (comments and formatting aside),
so a transformers version that changes the formula keeps its own forward. `restore()` puts every
forward back.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch.nn.functional as F
from torch import nn

from . import fused_kernels

_MLP_FORWARDS = ("""
def forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj
""", """
def forward(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
""")

_QWEN2_MOE_FORWARD = """
def forward(self, hidden_states):
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states_reshaped = hidden_states.view(-1, hidden_dim)
    shared_expert_output = self.shared_expert(hidden_states_reshaped)
    _, routing_weights, selected_experts = self.gate(hidden_states_reshaped)
    expert_output = self.experts(hidden_states_reshaped, selected_experts, routing_weights)
    shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states_reshaped)) * shared_expert_output
    expert_output = expert_output + shared_expert_output
    expert_output = expert_output.reshape(batch_size, sequence_length, hidden_dim)
    return expert_output
"""


def _shape(fn_src: str) -> tuple:
    """A function's argument names and body statements, without docstring, annotations, layout."""
    node = ast.parse(textwrap.dedent(fn_src)).body[0]
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    args = (tuple(a.arg for a in node.args.args), tuple(ast.dump(d) for d in node.args.defaults))
    return args, tuple(ast.dump(s) for s in body)


def source_is(fn, *expected: str) -> bool:
    """Whether the function `fn` is, statement for statement, one of the `expected` sources."""
    if not inspect.isfunction(fn) or hasattr(fn, "__wrapped__"):
        return False
    try:
        got = _shape(inspect.getsource(fn))
    except (OSError, TypeError, SyntaxError):
        return False
    return any(got == _shape(e) for e in expected)


def _is_silu(act) -> bool:
    if type(act) is nn.SiLU:
        return True
    if type(act).__name__ != "SiLUActivation" or "forward" in act.__dict__:
        return False
    try:
        return "nn.functional.silu(input)" in inspect.getsource(type(act).forward)
    except (OSError, TypeError):
        return False


def is_standard_mlp(m: nn.Module) -> bool:
    return ("forward" not in m.__dict__ and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(m, "act_fn", None)) and source_is(type(m).forward, *_MLP_FORWARDS))


def is_standard_qwen2_moe_block(m: nn.Module) -> bool:
    if "forward" in m.__dict__ or not all(hasattr(m, n) for n in ("shared_expert", "gate", "experts",
                                                                     "shared_expert_gate")):
        return False
    return inspect.getmodule(type(m)).__dict__.get("F") is F and source_is(type(m).forward, _QWEN2_MOE_FORWARD)


def _mlp_forward(m: nn.Module):
    def forward(x):
        g, u = m.gate_proj(x), m.up_proj(x)
        h = fused_kernels.silu_mul(g, u)
        return m.down_proj(m.act_fn(g) * u if h is None else h)
    return forward


def _qwen2_moe_forward(m: nn.Module):
    def forward(hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        x = hidden_states.view(-1, hidden_dim)
        shared = m.shared_expert(x)
        _, routing_weights, selected_experts = m.gate(x)
        experts = m.experts(x, selected_experts, routing_weights)
        gate = m.shared_expert_gate(x)
        out = fused_kernels.gated_add(experts, gate, shared)
        if out is None:
            out = experts + F.sigmoid(gate) * shared
        return out.reshape(batch_size, sequence_length, hidden_dim)
    return forward


class FusedBlocks:
    def __init__(self, model: nn.Module):
        self.modules = []
        for m in model.modules():
            if is_standard_mlp(m):
                m.forward = _mlp_forward(m)
            elif is_standard_qwen2_moe_block(m):
                m.forward = _qwen2_moe_forward(m)
            else:
                continue
            self.modules.append(m)

    def restore(self) -> None:
        for m in self.modules:
            del m.forward
        self.modules = []
