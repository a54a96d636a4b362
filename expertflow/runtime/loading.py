"""Build or load a model, optionally straight into offloaded form.

* Registry alias -> random weights at the real dims (exact for transfer and kernel cost), seeded.
  With `experts_on_host=True` the routed experts are generated directly into (pinned) host
  memory and only the non-expert part is materialised on the device: the GPU never holds all
  experts.
* Checkpoint directory with weights -> `from_pretrained` onto the CPU (the GPU never holds all
  experts); `offload()` then moves the non-expert part to the device.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import load_config, resolved_engine
from ..errors import DeviceError, ModelError
from ..registry import ModelSpec, resolve_model
from .adapters import find_moe_blocks, is_experts_module
from .offload import offload

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return _DTYPES[name]


def resolve_device(device: str | None) -> torch.device:
    """'auto'/None -> cuda if available else cpu; 'cuda' without a GPU -> DeviceError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} was requested but no CUDA GPU is available "
                          "(torch.cuda.is_available() is False); use --device cpu")
    return dev


def build_model(spec: ModelSpec | str, *, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "float32", seed: int = 0,
                experts_on_host: bool = False, pin_memory: bool | None = None,
                attn_implementation: str | None = None) -> nn.Module:
    """A transformers model for `spec` in eval mode.

    Random weights (aliases, or checkpoints without weights) are drawn N(0, initializer_range)
    like transformers' own init, seeded by `seed`. With `experts_on_host`, routed experts are
    created on the CPU (pinned when `device` is CUDA) and everything else on `device`.
    """
    if isinstance(spec, str):
        spec = resolve_model(spec)
    dev = torch.device(device)
    dt = torch_dtype(dtype)
    if spec.has_weights:
        return _load_checkpoint(spec, dev, dt, experts_on_host, attn_implementation)
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    cfg = spec.hf_config(**kwargs)
    if not experts_on_host and (dev.type == "cpu" or not _is_big(spec)):
        torch.manual_seed(seed)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
        return model.eval()
    pin = dev.type == "cuda" if pin_memory is None else pin_memory
    return _random_split(cfg, dev, dt, seed, experts_on_host, pin)


def _is_big(spec: ModelSpec) -> bool:
    return spec.param_counts()["total"] > 200_000_000


def _random_split(cfg, dev: torch.device, dt: torch.dtype, seed: int, experts_on_host: bool,
                  pin: bool) -> nn.Module:
    """Meta-initialise, then materialise non-experts on `dev` and experts on host (or `dev`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    gen_dev = dev
    gen = torch.Generator(device=gen_dev).manual_seed(seed)
    std = float(getattr(cfg, "initializer_range", 0.02) or 0.02)
    experts = {id(m) for m in model.modules() if is_experts_module(m)}
    for module in model.modules():
        if id(module) in experts:
            for name in ("gate_up_proj", "down_proj"):
                p = module._parameters[name]
                target = torch.device("cpu") if experts_on_host else dev
                t = torch.empty(p.shape, dtype=dt, device=target, pin_memory=pin and target.type == "cpu")
                _fill_normal(t, std, gen, gen_dev)
                module._parameters[name] = nn.Parameter(t, requires_grad=False)
            continue
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=dev),
                                                        requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=dev)
    # transformers' own init for everything but the experts (norms = 1, rotary inv_freq, ...),
    # with our generator so the result is seeded.
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if id(module) not in experts:
                model._init_weights(module)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after materialising: {leftover[:3]}")
    return model.eval()


def _fill_normal(t: torch.Tensor, std: float, gen: torch.Generator, gen_dev: torch.device) -> None:
    """Fill `t` with N(0, std) drawn on `gen_dev` in chunks (fast for pinned host targets)."""
    flat = t.view(-1)
    chunk = 1 << 28
    for i in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - i)
        r = torch.randn(n, generator=gen, device=gen_dev, dtype=torch.float32).mul_(std)
        flat[i:i + n].copy_(r.to(t.dtype))


def _load_checkpoint(spec: ModelSpec, dev: torch.device, dt: torch.dtype, experts_on_host: bool,
                     attn_implementation: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.checkpoint, dtype=dt, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load checkpoint {spec.checkpoint!r}: {exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0]}; is it a complete Hugging Face checkpoint?") from None
    model.eval()
    if not experts_on_host:
        model.to(dev)
    else:
        find_moe_blocks(model)  # fail early if it is not a MoE we support
    return model


def load_model(name_or_path: str, config=None, *, device: str | None = None,
               dtype: str | None = None, seed: int = 0, record_trace: bool | None = None):
    """Build/load `name_or_path`; with `config`, return (model, handle) already offloaded.

    Without a config: (model, None) entirely on `device`.
    """
    spec = resolve_model(name_or_path)
    if config is not None and not hasattr(config, "model"):
        config = load_config(config)
    dev = resolve_device(device or (config.runtime.device if config is not None else None))
    dt = dtype or (config.runtime.dtype if config is not None else ("bfloat16" if dev.type == "cuda" else "float32"))
    if config is None:
        return build_model(spec, device=dev, dtype=dt, seed=seed), None
    model = build_model(spec, device=dev, dtype=dt, seed=seed, experts_on_host=True,
                        pin_memory=dev.type == "cuda" and config.runtime.pin_memory)
    return model, attach_executor(model, config, dev, record_trace=record_trace)


def engine_kind(config, device: torch.device) -> str:
    """The decode executor `config.runtime.engine` asks for on `device`: auto = graph on CUDA."""
    return resolved_engine(config, device.type)


def attach_executor(model: nn.Module, config, device: torch.device, *, record_trace: bool | None = None):
    """The graph engine or the eager runtime, as the config says; both have .generate(), .stats,
    .reset_stats() and .detach() (and are context managers)."""
    if engine_kind(config, device) == "graph":
        if record_trace:
            raise ValueError("routing traces are recorded by the eager runtime; set runtime.engine: eager")
        from ..engine import attach  # noqa: PLC0415 - the graph engine imports triton: only when it runs

        return attach(model, config, device=str(device))
    return offload(model, config, device=str(device), record_trace=record_trace)


def experts_to_host(model: nn.Module, pin: bool = True) -> None:
    """Move every routed expert parameter to (pinned) host memory, in place.

    Later `offload()` calls then attach without copying the experts again (benchmarks and GPU
    tests attach many configs to one model).
    """
    for block in find_moe_blocks(model):
        ex = block.experts
        for name in ("gate_up_proj", "down_proj"):
            p = ex._parameters[name]
            host = torch.empty(p.shape, dtype=p.dtype, pin_memory=pin)
            host.copy_(p.data)
            ex._parameters[name] = nn.Parameter(host, requires_grad=p.requires_grad)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
