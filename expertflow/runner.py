"""What `ef-run` does, as a library: check a tuned config against the model and this machine,
build the model straight into offloaded form, generate, and summarise tokens/s, hit rate and
stall time (efcli/run.py prints it).

    prepare(config_path, model=None, device=None) -> Prepared   every check, before any work
    build(prepared, seed) -> (model, handle)                     the model, offloaded
    generate(prepared, handle, input_ids) -> dict                one generation, its summary
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import HostNeed, check_host_memory
from .config import RuntimeConfig, load_config
from .errors import ConfigError, DataError, DeviceError, ModelError
from .registry import ModelSpec, resolve_model

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def check_model_matches(config, spec: ModelSpec) -> None:
    """Refuse a config tuned for another model (by dims fingerprint)."""
    if config.model.fingerprint != spec.fingerprint:
        raise ModelError(
            f"config was tuned for {config.model.name!r} (fingerprint {config.model.fingerprint}) but "
            f"--model {spec.name!r} has fingerprint {spec.fingerprint} (different dims); tune a config "
            f"for it: ef-tune --model {spec.name} --budget ...")


def _config_device(config, path) -> str:
    """The config's device; a GPU config on a machine without one is refused in plain words."""
    import torch

    dev = config.runtime.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"config {str(path)!r} was tuned for {config.hardware.gpu_name or 'a CUDA GPU'} "
                          f"(runtime.device: {dev}) but this machine has no CUDA GPU; run it on a machine "
                          "with that GPU, or add --device cpu to run it here on the CPU (slowly)")
    return dev


def current_gpu_name() -> str | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return None


def tokenize(spec: ModelSpec, prompt: str | None, prompt_ids: str | None):
    """(input_ids [1, S], decode function). Checkpoints use their tokenizer.json; aliases (random
    weights, no tokenizer) map the prompt's UTF-8 bytes to ids modulo the vocabulary."""
    import torch

    if prompt_ids:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids {prompt_ids!r} is not a comma-separated list of integers; "
                              "write e.g. --prompt-ids 1,2,3") from None
        if not ids or any(i < 0 or i >= spec.vocab_size for i in ids):
            raise ConfigError(f"--prompt-ids {prompt_ids!r}: need at least one id, each in "
                              f"[0, {spec.vocab_size}) for {spec.name}")
        return torch.tensor([ids]), None
    text = DEFAULT_PROMPT if prompt is None else prompt
    if not text:
        raise DataError("--prompt is empty; pass some text (or --prompt-ids)")
    tok_file = Path(spec.checkpoint) / "tokenizer.json" if spec.checkpoint else None
    if tok_file is not None and tok_file.is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        return torch.tensor([tok.encode(text)]), tok.decode
    ids = [b % spec.vocab_size for b in text.encode("utf-8")]
    return torch.tensor([ids]), None


@dataclass
class Prepared:
    """A config checked against its model and this machine (see `prepare`)."""

    config: RuntimeConfig
    config_path: Path
    spec: ModelSpec
    device: Any  # torch.device
    host_need: HostNeed  # host memory the build needs (checked against what is available)
    max_new_tokens: int = 32
    notes: list[str] = field(default_factory=list)  # what the user should know before it runs


def prepare(config_path, *, model: str | None = None, device: str | None = None,
            max_new_tokens: int = 32) -> Prepared:
    """Load the config, resolve its model (or `model`: an alias runs random weights), check they
    match, pick the device (the config's unless `device`), and check host memory; notes say when
    the run will not match the config's predictions."""
    from .runtime.loading import resolve_device  # noqa: PLC0415 - torch, only when a model is built

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    config = load_config(config_path)
    spec = resolve_model(model or config.model.name)
    check_model_matches(config, spec)
    dev = resolve_device(device or _config_device(config, config_path))
    notes = []
    if dev.type == "cpu" and config.runtime.device.startswith("cuda"):
        notes.append(f"note: config was tuned for {config.hardware.gpu_name or 'a CUDA GPU'} "
                     f"(runtime.device: {config.runtime.device}); running it on the CPU (--device cpu), so "
                     "speeds will not match its predictions")
    gpu = current_gpu_name()
    if config.hardware.gpu_name and gpu and gpu != config.hardware.gpu_name:
        notes.append(f"warning: config was tuned for {config.hardware.gpu_name!r} but this GPU is "
                     f"{gpu!r}; it runs, but re-tune for best speed")
    need = check_host_memory(spec, dtype=config.runtime.dtype, device=str(dev), pin_memory=config.runtime.pin_memory)
    return Prepared(config, Path(config_path), spec, dev, need, max_new_tokens, notes)


def build(prep: Prepared, *, seed: int = 0):
    """(model, handle): the model built straight into offloaded form with the executor the
    config names (aliases get random weights from `seed`)."""
    from .runtime.loading import load_model  # noqa: PLC0415 - torch, only when a model is built

    return load_model(str(prep.spec.checkpoint or prep.spec.name), prep.config, device=str(prep.device), seed=seed)


def generate(prep: Prepared, handle, input_ids, *, decode=None) -> dict[str, Any]:
    """Generate `prep.max_new_tokens` greedily on the attached `handle` (detached afterwards) and
    return the run's summary (text, tokens/s, hit rate, misses, stall, counters)."""
    from .runtime.loading import engine_kind  # noqa: PLC0415 - torch, only when a model is built

    with handle:
        handle.reset_stats()
        res = handle.generate(input_ids, prep.max_new_tokens)
        stats = handle.stats
    new_ids = res.sequences[0, input_ids.shape[1]:].tolist()
    t = stats["total"]
    decode_tokens = max(res.new_tokens - 1, 0)
    return {
        "model": prep.spec.name, "config": str(prep.config_path), "device": str(prep.device),
        "engine": engine_kind(prep.config, prep.device), "prompt_tokens": int(input_ids.shape[1]),
        "new_tokens": res.new_tokens, "token_ids": new_ids, "text": decode(new_ids) if decode else None,
        "decode_tokens_per_s": res.decode_tokens_per_s, "prefill_ms": res.prefill_s * 1000,
        "hit_rate": t["hit_rate"], "misses": t["misses"],
        "misses_per_token": t["misses"] / res.new_tokens if res.new_tokens else 0.0,
        "stall_ms_per_token": t["stall_ms"] / decode_tokens if decode_tokens else 0.0,
        "bytes_moved": t["bytes_moved"], "prefetch_issued": t["prefetch_issued"],
        "prefetch_used": t["prefetch_used"], "activated_per_token": t["activated_per_token"],
    }
