"""Module forwards whose elementwise tails run as one Triton kernel (reversible, per instance).

* A gated MLP whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU
  act_fn: `silu(g) * u` is one kernel (`fused_kernels.silu_mul`) instead of two.
* Qwen2-MoE's sparse block whose forward is exactly transformers' (shared expert, router,
  experts, `sigmoid(shared_expert_gate(x)) * shared + experts`): the gate's sigmoid, the product
  and the sum are one kernel (`fused_kernels.gated_add`) instead of three.

* A decoder layer whose forward is exactly transformers' pre-norm layer (qwen2_moe, qwen3_moe,
  mixtral, olmoe, deepseek_v2): the residual add after attention and the post-attention RMSNorm
  are one kernel (`fused_kernels.add_rms_norm`); where the MLP is a fused Qwen2-MoE block, the
  residual add after it joins that block's kernel too.

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


_LAYER_HEAD = """
def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
            position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
"""
_MIXTRAL_HEAD = """
def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
            cache=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings,
                                      attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                      **kwargs)
"""
_LAYER_TAIL = """
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states
"""
_LAYER_FORWARDS = (_LAYER_HEAD + _LAYER_TAIL, _MIXTRAL_HEAD + _LAYER_TAIL)


def _shape(fn_src: str) -> tuple:
    """A function's argument names and body statements, without docstring, annotations, layout."""
    node = ast.parse(textwrap.dedent(fn_src)).body[0]
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    args = (tuple(a.arg for a in node.args.args), tuple(ast.dump(d) for d in node.args.defaults))
    return args, tuple(ast.dump(s) for s in body)


def source_is(fn, *expected: str, unwrap: bool = False) -> bool:
    """Whether the function `fn` is, statement for statement, one of the `expected` sources
    (`unwrap`: the function under its decorators, e.g. transformers' deprecate_kwarg)."""
    fn = inspect.unwrap(fn) if unwrap and inspect.isfunction(fn) else fn
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


def is_standard_layer(m: nn.Module, norm_ok) -> bool:
    if "forward" in m.__dict__ or not all(hasattr(m, n) for n in ("input_layernorm", "self_attn",
                                                                     "post_attention_layernorm", "mlp")):
        return False
    return norm_ok(m.post_attention_layernorm) and source_is(type(m).forward, *_LAYER_FORWARDS, unwrap=True)


def _mlp_forward(m: nn.Module):
    def forward(x):
        g, u = m.gate_proj(x), m.up_proj(x)
        h = fused_kernels.silu_mul(g, u)
        return m.down_proj(m.act_fn(g) * u if h is None else h)
    return forward


def _qwen2_moe_forward(m: nn.Module):
    def forward(hidden_states, residual=None):
        """The block's output; with `residual`, residual + the output (the layer's add)."""
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        x = hidden_states.view(-1, hidden_dim)
        shared = m.shared_expert(x)
        _, routing_weights, selected_experts = m.gate(x)
        experts = m.experts(x, selected_experts, routing_weights)
        gate = m.shared_expert_gate(x)
        out = fused_kernels.gated_add(experts, gate, shared, residual)
        if out is None:
            out = (experts + F.sigmoid(gate) * shared).reshape(batch_size, sequence_length, hidden_dim)
            return out if residual is None else residual + out
        return out.reshape(batch_size, sequence_length, hidden_dim)
    forward.takes_residual = True
    return forward


def _layer_forward(layer: nn.Module):
    sig = inspect.signature(inspect.unwrap(type(layer).forward))
    var_kw = next(n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD)
    norm = layer.post_attention_layernorm

    def forward(*args, **kwargs):
        bound = sig.bind(layer, *args, **kwargs)
        bound.apply_defaults()
        named = dict(bound.arguments)
        del named["self"]
        extra = named.pop(var_kw, {})
        residual = named.pop("hidden_states")
        h = layer.input_layernorm(residual)
        h, _ = layer.self_attn(hidden_states=h, **named, **extra)  # every argument by name, as both do
        fused = fused_kernels.add_rms_norm(residual, h, norm.weight, norm.variance_epsilon)
        if fused is None:
            residual = residual + h
            h = norm(residual)
        else:
            h, residual = fused
        if getattr(layer.mlp.__dict__.get("forward"), "takes_residual", False):
            return layer.mlp(h, residual=residual)
        return residual + layer.mlp(h)
    return forward


class FusedBlocks:
    def __init__(self, model: nn.Module, norm_ok):
        """`norm_ok(module)`: whether a norm is the RMSNorm that add_rms_norm computes."""
        self.modules = []
        for m in model.modules():
            if is_standard_layer(m, norm_ok):
                m.forward = _layer_forward(m)
            elif is_standard_mlp(m):
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
