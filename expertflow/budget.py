"""GPU memory budget: parse sizes, account for every resident byte, derive the expert-cache size.

Torch-free. The accounting (all in bytes, `dtype` weights):

    budget = non-expert weights + KV cache + activation workspace + safety margin + expert cache

* non-expert weights: every parameter that is not a routed expert (embeddings, attention,
  norms, routers, shared experts, dense MLPs, LM head), counted on transformers' module tree.
* KV cache: `kv_bytes_per_token x max_context_tokens x max_batch` (what DynamicCache stores);
  max_context_tokens defaults to the model's max_position_embeddings, at most 4096
  (`default_max_context`): a model that attends 1024 tokens never holds a 4096-token cache.
* workspace: the largest live activations of one forward at `max_batch x prefill_chunk_tokens`
  tokens (hidden states, the widest MLP intermediate, attention scores, fp32 logits of the last
  position) plus a fixed allocator/fragmentation reserve.
* margin: `margin_fraction` of the budget, for what the estimate misses.
* expert cache: what remains, in whole experts (`bytes_per_expert`), capped at all experts.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import BudgetError, UsageError
from .registry import DTYPE_BYTES

_UNITS = {
    "b": (1, "bytes"),
    "kb": (10**3, "decimal kB = 10^3 bytes"),
    "mb": (10**6, "decimal MB = 10^6 bytes"),
    "gb": (10**9, "decimal GB = 10^9 bytes"),
    "tb": (10**12, "decimal TB = 10^12 bytes"),
    "kib": (2**10, "binary KiB = 2^10 bytes"),
    "mib": (2**20, "binary MiB = 2^20 bytes"),
    "gib": (2**30, "binary GiB = 2^30 bytes"),
    "tib": (2**40, "binary TiB = 2^40 bytes"),
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")

#: Fixed reserve for the caching allocator's fragmentation and cuBLAS/cuDNN workspaces.
ALLOCATOR_RESERVE_BYTES = 256 * 2**20
#: KV-cache tokens reserved by default (lowered to the model's max_position_embeddings).
DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class ParsedSize:
    bytes: int
    text: str
    unit_meaning: str

    def describe(self) -> str:
        return f"{self.text} = {self.bytes:,} bytes ({self.unit_meaning})"


def parse_size(text: str | int) -> ParsedSize:
    """Parse '24GB', '24GiB', '24000MB', '0.5TB' (GB = 10^9 bytes, GiB = 2^30 bytes).

    A bare integer is bytes. Raises `BudgetError` for anything else.
    """
    if isinstance(text, bool):
        raise BudgetError(f"memory size {text!r} is not a size; write e.g. 24GB or 24GiB")
    if isinstance(text, int):
        if text <= 0:
            raise BudgetError(f"memory size {text} must be positive; write e.g. 24GB or 24GiB")
        return ParsedSize(text, str(text), "bytes")
    if str(text).strip().startswith("-"):
        raise BudgetError(f"memory size {str(text).strip()!r} is negative; a budget must be positive, "
                          "e.g. 24GB or 22GiB")
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if unit == "":
        unit = "b"
    if not m or unit not in _UNITS:
        raise BudgetError(
            f"memory size {text!r} is malformed; write a number and a unit: B, kB, MB, GB, TB "
            "(powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. 24GB or 22.5GiB"
        )
    factor, meaning = _UNITS[unit]
    value = float(m.group(1)) * factor
    if value < 1 or not math.isfinite(value):
        raise BudgetError(f"memory size {text!r} must be at least 1 byte; write e.g. 24GB")
    return ParsedSize(int(value), str(text).strip(), meaning)


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: 3.46 GiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MemoryPlan:
    """The budget split into its terms; `capacity_experts` is the derived expert-cache size."""

    budget_bytes: int
    non_expert_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    margin_bytes: int
    expert_cache_bytes: int
    bytes_per_expert: int
    capacity_experts: int
    total_experts: int
    max_context_tokens: int
    max_batch: int
    prefill_chunk_tokens: int = 512
    margin_fraction: float = 0.05
    budget_text: str = ""
    budget_unit: str = ""  # which unit the text was read in, e.g. "decimal GB = 10^9 bytes"

    @property
    def fits_all_experts(self) -> bool:
        return self.capacity_experts >= self.total_experts

    def terms(self) -> list[tuple[str, int]]:
        """(label, bytes) rows that add up to the budget (the report's stacked bar)."""
        unused = self.budget_bytes - (self.non_expert_bytes + self.kv_cache_bytes
                                      + self.workspace_bytes + self.margin_bytes
                                      + self.capacity_experts * self.bytes_per_expert)
        return [
            ("non-expert weights", self.non_expert_bytes),
            ("KV cache", self.kv_cache_bytes),
            ("activation workspace", self.workspace_bytes),
            ("safety margin", self.margin_bytes),
            ("expert cache", self.capacity_experts * self.bytes_per_expert),
            ("unused", unused),
        ]

    def describe(self) -> str:
        if self.budget_text:
            read = ParsedSize(self.budget_bytes, self.budget_text, self.budget_unit or "bytes")
            head = f"memory budget {read.describe()} = {format_bytes(self.budget_bytes)}:"
        else:
            head = f"memory budget {format_bytes(self.budget_bytes)} ({self.budget_bytes:,} bytes):"
        lines = [head]
        for label, value in self.terms():
            lines.append(f"  {label:<22} {format_bytes(value):>12}  ({value:,} bytes)")
        share = self.capacity_experts / max(1, self.total_experts)
        lines.append(
            f"  expert cache capacity  {self.capacity_experts} of {self.total_experts} experts "
            f"({share:.1%}), {format_bytes(self.bytes_per_expert)} each"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return asdict(self)


def model_max_context(spec) -> int | None:
    """The model's max_position_embeddings (the longest context it attends), None if unknown."""
    value = (getattr(spec, "config", None) or {}).get("max_position_embeddings")
    return int(value) if value else None


def default_max_context(spec) -> int:
    """KV-cache tokens to reserve when none are given: DEFAULT_MAX_CONTEXT, capped at the
    model's max_position_embeddings."""
    limit = model_max_context(spec)
    return min(DEFAULT_MAX_CONTEXT, limit) if limit else DEFAULT_MAX_CONTEXT


def check_max_context(spec, tokens: int | None, *, flag: str = "--max-context") -> int:
    """`tokens` (or the default when None), refused with a UsageError (exit 2) when it is below
    1 or above the model's max_position_embeddings: a longer KV cache only takes memory from
    the expert cache."""
    if tokens is None:
        return default_max_context(spec)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise UsageError(f"{flag} {tokens!r} must be a whole number of tokens >= 1")
    limit = model_max_context(spec)
    if limit is not None and tokens > limit:
        raise UsageError(f"{flag} {tokens} is more than {spec.name}'s max_position_embeddings ({limit}): "
                         f"it never attends that far, and the longer KV cache would take memory from "
                         f"the expert cache; pass {flag} {limit} or less, or leave it out (default "
                         f"{default_max_context(spec)})")
    return tokens


def workspace_bytes(spec, *, max_batch: int, prefill_chunk_tokens: int, dtype: str = "bfloat16") -> int:
    """Peak activation bytes of one forward over `max_batch x prefill_chunk_tokens` tokens."""
    b = DTYPE_BYTES[dtype]
    t = max_batch * prefill_chunk_tokens
    h = spec.hidden_size
    cfg = spec.config
    widest = max(
        int(cfg.get("intermediate_size", 0) or 0),
        int(cfg.get("shared_expert_intermediate_size", 0) or 0),
        spec.top_k * spec.expert_intermediate_size,
    )
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    # hidden + residual + normed copies, the widest gated MLP intermediate (gate, up, product),
    # and one layer's attention scores (fp32 softmax) for the chunk against itself.
    activations = t * (6 * h + 3 * widest) * b + max_batch * heads * prefill_chunk_tokens**2 * 4
    logits = max_batch * spec.vocab_size * 4 * 2  # fp32 logits of the last position (+ sampling copy)
    return int(activations + logits + ALLOCATOR_RESERVE_BYTES)


def plan_memory(
    spec,
    budget: str | int | ParsedSize,
    *,
    max_context_tokens: int | None = None,
    max_batch: int = 1,
    prefill_chunk_tokens: int = 512,
    margin_fraction: float = 0.05,
    dtype: str = "bfloat16",
) -> MemoryPlan:
    """Split `budget` into its terms for `spec` and derive the expert-cache capacity.

    `max_context_tokens` None = `default_max_context(spec)`. Raises `BudgetError` with the
    numbers when the budget cannot hold the non-expert part.
    """
    parsed = budget if isinstance(budget, ParsedSize) else parse_size(budget)
    if max_context_tokens is None:
        max_context_tokens = default_max_context(spec)
    if max_context_tokens < 1 or max_batch < 1 or prefill_chunk_tokens < 1:
        raise BudgetError(
            f"max_context_tokens={max_context_tokens}, max_batch={max_batch} and "
            f"prefill_chunk_tokens={prefill_chunk_tokens} must all be >= 1"
        )
    if not 0 <= margin_fraction < 0.5:
        raise BudgetError(f"margin_fraction={margin_fraction} must be in [0, 0.5)")
    non_expert = spec.non_expert_bytes(dtype)
    kv = spec.kv_bytes_per_token(dtype) * max_context_tokens * max_batch
    work = workspace_bytes(spec, max_batch=max_batch,
                           prefill_chunk_tokens=min(prefill_chunk_tokens, max_context_tokens),
                           dtype=dtype)
    margin = int(parsed.bytes * margin_fraction)
    per_expert = spec.bytes_per_expert(dtype)
    total_experts = spec.num_moe_layers * spec.num_experts
    fixed = non_expert + kv + work + margin
    # At least one expert slot must fit: experts stream through it when nothing else does.
    needed = fixed + per_expert
    if parsed.bytes < needed:
        raise BudgetError(
            f"budget too small for {spec.name}: needed at least {format_bytes(needed)} "
            f"({needed:,} bytes), given {parsed.describe()} = {format_bytes(parsed.bytes)}; needed = "
            f"non-expert weights {format_bytes(non_expert)}, KV cache "
            f"{format_bytes(kv)} for {max_context_tokens} tokens x batch {max_batch}, workspace "
            f"{format_bytes(work)}, margin {format_bytes(margin)}, one expert {format_bytes(per_expert)}; "
            "raise --budget or lower --max-context"
        )
    cache_bytes = parsed.bytes - fixed
    capacity = min(total_experts, cache_bytes // per_expert)
    return MemoryPlan(parsed.bytes, non_expert, kv, work, margin, cache_bytes, per_expert,
                      int(capacity), total_experts, max_context_tokens, max_batch,
                      prefill_chunk_tokens, margin_fraction, parsed.text, parsed.unit_meaning)


# ---- host memory ------------------------------------------------------------------------------
def host_memory_available_bytes() -> int | None:
    """Host RAM this process can still take: /proc/meminfo's MemAvailable, lowered to the cgroup
    limit's headroom in a container; None where neither can be read (not Linux)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        avail = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            room = max(int(limit) - used, 0)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


@dataclass(frozen=True)
class HostNeed:
    """Host RAM a model needs to be built for offloaded inference on `device`."""

    total_bytes: int  # all of it: every weight on a CPU run, the routed experts on a GPU run
    pinned_bytes: int  # the part that is page-locked (host->GPU copies); 0 on a CPU run
    params: int


def host_memory_need(spec, *, dtype: str, device: str, pin_memory: bool = True) -> HostNeed:
    """What building `spec` needs in host RAM (imports torch/transformers to count parameters on
    the meta device). On a GPU run the routed experts live in host memory (pinned when
    `pin_memory`); on a CPU run every weight does."""
    counts = spec.param_counts()
    per = DTYPE_BYTES[dtype]
    if str(device).startswith("cuda"):
        total = counts["routed"] * per
        return HostNeed(total, total if pin_memory else 0, counts["total"])
    return HostNeed(counts["total"] * per, 0, counts["total"])


def check_host_memory(spec, *, dtype: str, device: str, pin_memory: bool = True,
                      available_bytes: int | None = None) -> HostNeed:
    """BudgetError (one line, the numbers) when this machine's free host RAM cannot hold what
    building `spec` needs; before anything is allocated. Returns the need."""
    need = host_memory_need(spec, dtype=dtype, device=device, pin_memory=pin_memory)
    avail = host_memory_available_bytes() if available_bytes is None else available_bytes
    if avail is not None and need.total_bytes > avail:
        pinned = (f", {format_bytes(need.pinned_bytes)} of it pinned for host->GPU copies"
                  if need.pinned_bytes else "")
        where = "every weight on the CPU" if not str(device).startswith("cuda") else "its routed experts in host memory"
        raise BudgetError(
            f"{spec.name} needs {format_bytes(need.total_bytes)} of host memory ({need.params / 1e9:.2f}B "
            f"parameters in {dtype}, {where}{pinned}) but this machine has {format_bytes(avail)} "
            "available; run it on a machine with more memory (or a GPU: then only the experts stay "
            "in host memory), free some memory, or pick a smaller model")
    return need
