"""The deployable config (`RuntimeConfig`): a versioned YAML file that `ef-tune` writes and
`ef-run` / `expertflow.offload` load.

Loading is strict: an unknown key, a wrong type or an out-of-range value raises one
`ConfigError` line that names the dotted key, the value seen and what is allowed.
Save -> load is lossless. `config_json_schema()` is the JSON Schema for editors
(`ef-run --schema`).

Each field's description states its trade-off; the tuner searches the fields named in
search_spaces/*.yaml by their dotted paths.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .fsutil import atomic_write_text

CONFIG_VERSION = 1
SCHEMA_COMMENT = "# ExpertFlow RuntimeConfig v{v}; JSON Schema: `ef-run --schema`\n"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True,
                              validate_default=True)


Architecture = Literal["qwen2_moe", "mixtral", "qwen3_moe", "olmoe", "deepseek_v2"]
Policy = Literal["lru", "lfu", "static", "expertflow"]


class ModelIdentity(_Strict):
    name: str = Field(description="registry alias or checkpoint path the config was tuned for")
    architecture: Architecture = Field(description="transformers model_type")
    fingerprint: str = Field(pattern=r"^dims-[0-9a-f]{16}$",
                             description="hash of the model dims; ef-run refuses a model whose "
                                         "fingerprint differs")
    num_moe_layers: int = Field(ge=1)
    num_experts: int = Field(ge=1, description="routed experts per MoE layer")
    top_k: int = Field(ge=1)


class AdaptiveK(_Strict):
    threshold: float = Field(
        1.0, gt=0.0, le=1.0,
        description="per token keep the smallest prefix of its top-k experts (by gate weight) "
                    "whose mass reaches this share of the top-k mass; 1.0 = exact top-k. Lower "
                    "moves fewer experts and costs quality")
    min_k: int = Field(1, ge=1, description="never keep fewer experts per token than this")
    renormalize: bool = Field(
        False, description="rescale the kept weights so they sum to the full top-k mass; "
                           "False keeps the router's weights as they are (dropped ones are 0)")


class ExpertFlowPolicy(_Strict):
    freq_weight: float = Field(
        0.5, ge=0.0, le=1.0,
        description="expertflow eviction: weight of (profiled prior + observed) frequency "
                    "against recency; 0 = pure recency (LRU-like), 1 = pure frequency")
    decay: float = Field(0.95, gt=0.0, lt=1.0,
                         description="per-access decay of observed frequency; higher = longer memory")
    prediction_bonus: float = Field(
        1.0, ge=0.0,
        description="score added to experts the predictor expects in the next layers; "
                    "protects prefetched experts from eviction before use")


class Cache(_Strict):
    capacity_experts: int = Field(ge=1, description="GPU expert slots in total (all layers); "
                                                    "more = higher hit rate, more memory")
    scope: Literal["per_layer", "pooled"] = Field(
        "per_layer", description="per_layer: each layer owns its slots; pooled: one pool, "
                                 "eviction across layers")
    allocation: Literal["uniform", "demand"] = Field(
        "uniform", description="per_layer split: uniform, or by profiled demand (skewed layers "
                               "need fewer slots for the same hit rate)")
    per_layer_capacity: list[int] | None = Field(
        None, description="explicit slots per MoE layer (overrides allocation); sums to at most "
                          "capacity_experts")
    policy: Policy = Field("lru", description="eviction policy: lru, lfu, static (pin the "
                                              "hottest experts from the profile), expertflow")
    read_through_slots: int = Field(
        1, ge=0, le=16, description="graph engine: free slots per layer and step parity that a "
                                    "missed expert is written into while the kernel reads it from the "
                                    "host (admission without a second transfer); more admits more "
                                    "misses per step but keeps 2x as many slots out of the live cache; "
                                    "0 = never admit (misses are only read). Measured on the H200 at "
                                    "qwen2-moe 12GB (LFU): 1 slot 71.6 tok/s, 2 slots 63.8")
    warm_start: bool = Field(True, description="fill the slots with the profile's hottest experts "
                                               "at attach (fewer cold misses, slower attach)")
    expertflow: ExpertFlowPolicy = Field(default_factory=ExpertFlowPolicy)
    priors: list[list[float]] | None = Field(
        None, description="per MoE layer, per expert activation frequency from the profile; "
                          "used by static, expertflow, demand allocation and warm start")


class Prefetch(_Strict):
    depth: int = Field(1, ge=0, le=8, description="layers ahead to prefetch predicted experts; "
                                                  "0 = off. Deeper hides more copy time but "
                                                  "predicts worse")
    adaptive: bool = Field(False, description="choose the depth per layer from S = experts x "
                                              "bytes / (bandwidth x layer time), lowered where "
                                              "recent prediction precision is poor")
    predictor: Literal["next_gate"] = Field(
        "next_gate", description="next_gate: apply the upcoming layers' gates to the current "
                                 "hidden state")
    width: int = Field(0, ge=0, description="experts to prefetch per predicted layer per token; "
                                            "0 = top_k")
    min_precision: float = Field(0.3, ge=0.0, le=1.0,
                                 description="adaptive: skip lookahead distances whose recent "
                                             "precision is below this")
    bandwidth_gbps: float | None = Field(None, gt=0.0, description="host->device bandwidth for "
                                                                   "the adaptive horizon (profile)")
    layer_time_ms: float | None = Field(None, gt=0.0, description="decode time of one layer for "
                                                                  "the adaptive horizon (profile)")


class Memory(_Strict):
    budget_bytes: int = Field(ge=1, description="GPU memory the runtime may use")
    budget_text: str = Field(description="the budget as the user wrote it, e.g. 24GB")
    max_context_tokens: int = Field(4096, ge=1)
    max_batch: int = Field(1, ge=1)
    prefill_chunk_tokens: int = Field(512, ge=1)
    margin_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    non_expert_bytes: int = Field(ge=0)
    kv_cache_bytes: int = Field(ge=0)
    workspace_bytes: int = Field(ge=0)
    margin_bytes: int = Field(ge=0)
    expert_cache_bytes: int = Field(ge=0)
    bytes_per_expert: int = Field(ge=1)
    enforce_budget: bool = Field(True, description="graph engine on CUDA: cap this process's CUDA "
                                                   "caching allocator at budget_bytes while attached "
                                                   "(it frees cached blocks before it would exceed "
                                                   "it), so reserved memory stays within the budget; "
                                                   "what else the process holds on the GPU counts too")


class Hardware(_Strict):
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = Field(None, ge=0)
    pcie_generation: int | None = Field(None, ge=1, le=8)
    pcie_width: int | None = Field(None, ge=1, le=32)


class Runtime(_Strict):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = Field("cuda", pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    pin_memory: bool = Field(True, description="page-locked host store: ~3x faster copies than "
                                               "pageable memory (CUDA only)")
    record_trace: bool = Field(False, description="record per-layer routing (ids, weights) for "
                                                  "the profiler/simulator")
    experts_kernel: Literal["auto", "batched_mm", "grouped_mm", "eager"] = Field(
        "auto", description="transformers experts kernel run over the slot pool; auto = batched_mm "
                            "for few token-expert pairs (decode), grouped_mm for many (prefill)")
    engine: Literal["auto", "graph", "eager"] = Field(
        "auto", description="decode executor: graph = the decode step captured as one CUDA graph, "
                            "experts read through a device address table, cache decisions one step "
                            "behind (expertflow.engine); eager = transformers modules per step with "
                            "one host sync per MoE layer (the reference); auto = graph on CUDA, "
                            "eager on CPU")


def resolved_engine(config, device_type: str | None = None) -> str:
    """The decode executor `config.runtime.engine` asks for on a device of `device_type`
    ("cuda" / "cpu"; default: the config's own runtime.device): auto = graph on CUDA."""
    kind = config.runtime.engine
    if kind == "auto":
        dev = device_type or config.runtime.device
        kind = "graph" if str(dev).startswith("cuda") else "eager"
    return kind


class Provenance(_Strict):
    tool_version: str
    created_at: str
    profile_id: str | None = None
    study_name: str | None = None
    trial_number: int | None = None
    routing: Literal["real", "synthetic"] | None = None
    hardware_source: str | None = None
    predicted: dict[str, float] = Field(default_factory=dict)
    measured: dict[str, float] = Field(default_factory=dict)


class RuntimeConfig(_Strict):
    """The deployable configuration of ExpertFlow's scheduler for one model and GPU budget."""

    version: Literal[1] = CONFIG_VERSION
    model: ModelIdentity
    adaptive_k: AdaptiveK = Field(default_factory=AdaptiveK)
    cache: Cache
    prefetch: Prefetch = Field(default_factory=Prefetch)
    memory: Memory
    hardware: Hardware = Field(default_factory=Hardware)
    runtime: Runtime = Field(default_factory=Runtime)
    provenance: Provenance

    @model_validator(mode="after")
    def _cross_checks(self) -> RuntimeConfig:
        m, c = self.model, self.cache
        total = m.num_moe_layers * m.num_experts
        if self.adaptive_k.min_k > m.top_k:
            raise _cross("adaptive_k.min_k", self.adaptive_k.min_k, f"an integer in [1, top_k={m.top_k}]")
        if c.capacity_experts > total:
            raise _cross("cache.capacity_experts", c.capacity_experts,
                         f"at most all {total} experts ({m.num_moe_layers} layers x {m.num_experts})")
        if c.per_layer_capacity is not None:
            p = c.per_layer_capacity
            if len(p) != m.num_moe_layers or any(x < 1 or x > m.num_experts for x in p):
                raise _cross("cache.per_layer_capacity", p,
                             f"{m.num_moe_layers} integers, each in [1, {m.num_experts}]")
            if sum(p) > c.capacity_experts:
                raise _cross("cache.per_layer_capacity", p,
                             f"a sum of at most cache.capacity_experts={c.capacity_experts}")
        if c.scope == "per_layer" and c.per_layer_capacity is None and c.capacity_experts < m.num_moe_layers:
            raise _cross("cache.capacity_experts", c.capacity_experts,
                         f"at least one slot per layer ({m.num_moe_layers}) with scope per_layer")
        if c.priors is not None:
            ok = len(c.priors) == m.num_moe_layers and all(
                len(row) == m.num_experts and all(v >= 0 and v == v for v in row) for row in c.priors)
            if not ok:
                widths = sorted({len(row) for row in c.priors})
                raise _cross("cache.priors", _Shown(f"{len(c.priors)} rows of lengths {widths}"),
                             f"{m.num_moe_layers} rows of {m.num_experts} non-negative numbers")
        if c.policy == "static" and c.priors is None:
            raise _cross("cache.policy", "static", "static needs cache.priors (from a profile); "
                         "use lru or lfu without one")
        if c.allocation == "demand" and c.priors is None and c.per_layer_capacity is None:
            raise _cross("cache.allocation", "demand", "demand needs cache.priors (from a profile)")
        mem = self.memory
        if c.capacity_experts * mem.bytes_per_expert > mem.expert_cache_bytes:
            raise _cross("cache.capacity_experts", c.capacity_experts,
                         f"at most memory.expert_cache_bytes // memory.bytes_per_expert = "
                         f"{mem.expert_cache_bytes // mem.bytes_per_expert} (the budget's expert cache)")
        return self

    # ---- convenience ------------------------------------------------------------------------
    def get(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    def with_values(self, values: dict[str, Any]) -> RuntimeConfig:
        """A validated copy with dotted-path overrides, e.g. {'prefetch.depth': 2}."""
        data = self.model_dump(mode="json")
        for dotted, value in values.items():
            node = data
            parts = dotted.split(".")
            for part in parts[:-1]:
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"config key {dotted!r}: unknown key {part!r}; see `ef-run --schema`")
                node = node[part]
            if not isinstance(node, dict) or parts[-1] not in node:
                raise ConfigError(f"config key {dotted!r}: unknown key; see `ef-run --schema`")
            node[parts[-1]] = value
        return config_from_dict(data)

    def to_yaml(self) -> str:
        """The config as YAML: one line per setting, and the activation priors (one row of E
        values per MoE layer) one line per layer, so the settings stay readable around them."""
        data = self.model_dump(mode="json")
        priors = data["cache"].get("priors")
        marker = "__EXPERTFLOW_PRIORS__"
        if priors:
            data["cache"]["priors"] = marker
        body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
        if priors:
            rows = "\n".join("  - [" + ", ".join(_short_float(v) for v in row) + "]" for row in priors)
            body = body.replace(f"priors: {marker}\n", f"priors:  # activation share per expert, one row per MoE layer\n{rows}\n", 1)
        return SCHEMA_COMMENT.format(v=self.version) + body


def _short_float(v: float) -> str:
    """A float as YAML reads it back exactly, in its shortest form (0.0123, 2.84e-05): PyYAML's
    own representer (YAML 1.1 wants the dot in 5.0e-324)."""
    return _YAML_FLOAT.represent_float(float(v)).value


_YAML_FLOAT = yaml.representer.SafeRepresenter()


class _Shown(str):
    """A summary of a value too large to print; shown as is, without quotes."""

    def __repr__(self) -> str:
        return str(self)


def _cross(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"@@{key}@@{value!r}@@{allowed}")


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"]
    if msg.startswith("Value error, @@"):
        _, key, value, allowed = msg.split("@@", 3)
        return f"config key {key!r}: got {value}; allowed: {allowed}"
    if e["type"] == "extra_forbidden":
        parent = _submodel_at(model, e["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see `ef-run --schema`"
        return f"config key {loc!r}: unknown key (value {e.get('input')!r}); allowed keys here: {allowed}"
    if e["type"] == "missing":
        return f"config key {loc!r}: missing; it is required (see `ef-run --schema`)"
    value = e.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    allowed = msg[0].lower() + msg[1:]
    ctx = e.get("ctx") or {}
    if "expected" in ctx:
        allowed = f"one of {ctx['expected']}"
    return f"config key {loc!r}: got {shown}; allowed: {allowed}"


def _submodel_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        cur = ann
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def config_from_dict(data: Any, *, source: str = "config") -> RuntimeConfig:
    """Validate a parsed mapping into a `RuntimeConfig` (raises one-line `ConfigError`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys at the top level, got "
                          f"{type(data).__name__}; see `ef-run --schema`")
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"config key 'version': got {version!r}; allowed: {CONFIG_VERSION} "
                          "(this ExpertFlow reads config version 1; re-run ef-tune)")
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_validation_error(err, RuntimeConfig)}") from None


def read_yaml_file(path: str | os.PathLike, *, what: str, missing_hint: str) -> Any:
    """Read and parse a YAML file; every failure is one ConfigError line naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(p)!r} does not exist; {missing_hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {str(p)!r} cannot be read ({exc.__class__.__name__}); "
                          "pass a UTF-8 YAML file") from None
    return parse_yaml_text(text, what=f"{what} {str(p)!r}")


def parse_yaml_text(text: str, *, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}; fix the syntax") from None


def load_config(path: str | os.PathLike) -> RuntimeConfig:
    """Load and strictly validate a config YAML file."""
    data = read_yaml_file(path, what="config file", missing_hint="pass the config.yaml that ef-tune wrote")
    return config_from_dict(data, source=str(Path(path)))


def save_config(config: RuntimeConfig, path: str | os.PathLike) -> Path:
    """Write `config` as YAML atomically (a reader never sees half a file)."""
    return atomic_write_text(path, config.to_yaml())


def config_json_schema() -> dict[str, Any]:
    schema = RuntimeConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ExpertFlow RuntimeConfig"
    return schema


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("expertflow")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+source"


def describe_hardware(hw: dict[str, Any]) -> str:
    """What a tuning run's timing came from (tuning.json's `hardware`), in words that do not
    suggest a GPU that is not here: 'tuned for the bundled H200 profile (NVIDIA H200), not
    measured on this machine'."""
    source = str(hw.get("source") or "")
    if source.startswith("bundled:"):
        return (f"tuned for the bundled {source.split(':', 1)[1].upper()} profile"
                f"{' (' + hw['gpu_name'] + ')' if hw.get('gpu_name') else ''}, not measured on this machine")
    if hw.get("gpu_name"):
        return f"tuned on this machine's {hw['gpu_name']}"
    return "no GPU: timing measured on this machine's CPU"


def default_config(spec, plan, *, hardware: Hardware | None = None, priors=None,
                   profile_id: str | None = None, routing: str | None = None,
                   device: str = "cuda", dtype: str = "bfloat16") -> RuntimeConfig:
    """The untuned default for `spec` under memory `plan`: exact top-k, LRU, prefetch depth 1."""
    capacity = max(min(plan.capacity_experts, plan.total_experts), 1)
    if capacity < spec.num_moe_layers:
        scope = "pooled"  # fewer slots than layers: only a shared pool can stream experts
    else:
        scope = "per_layer"
    data = {
        "version": CONFIG_VERSION,
        "model": {"name": spec.name, "architecture": spec.architecture,
                  "fingerprint": spec.fingerprint, "num_moe_layers": spec.num_moe_layers,
                  "num_experts": spec.num_experts, "top_k": spec.top_k},
        "cache": {"capacity_experts": capacity, "scope": scope,
                  "priors": [list(map(float, r)) for r in priors] if priors is not None else None},
        "memory": {"budget_bytes": plan.budget_bytes, "budget_text": _budget_text(plan),
                   "max_context_tokens": plan.max_context_tokens, "max_batch": plan.max_batch,
                   "prefill_chunk_tokens": plan.prefill_chunk_tokens,
                   "margin_fraction": plan.margin_fraction,
                   "non_expert_bytes": plan.non_expert_bytes, "kv_cache_bytes": plan.kv_cache_bytes,
                   "workspace_bytes": plan.workspace_bytes, "margin_bytes": plan.margin_bytes,
                   "expert_cache_bytes": plan.expert_cache_bytes,
                   "bytes_per_expert": plan.bytes_per_expert},
        "hardware": (hardware or Hardware()).model_dump(mode="json"),
        "runtime": {"device": device, "dtype": dtype},
        "provenance": {"tool_version": tool_version(), "created_at": now_iso(),
                       "profile_id": profile_id, "routing": routing},
    }
    return config_from_dict(data)


def _budget_text(plan) -> str:
    return getattr(plan, "budget_text", None) or f"{plan.budget_bytes}B"


# ---- introspection of the fields (the tuner's search space reads it) ---------------------------
def _unwrap_optional(ann):
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return args[0] if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1 else ann


def config_field(dotted: str):
    """(annotation without Optional, FieldInfo) of a dotted RuntimeConfig path; KeyError (the
    first unknown part) if none."""
    model: Any = RuntimeConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            raise KeyError(".".join(parts[:i + 1]))
        info = model.model_fields[part]
        model = _unwrap_optional(info.annotation)
    return model, info


def field_range(dotted: str) -> dict[str, float]:
    """{'ge'|'gt'|'le'|'lt': bound} of a RuntimeConfig field (empty if unbounded)."""
    info = config_field(dotted)[1]
    return {n: getattr(m, n) for m in info.metadata for n in ("ge", "gt", "le", "lt") if getattr(m, n, None) is not None}


def leaf_fields(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted path of a RuntimeConfig field that is not a section, in declaration order."""
    out: list[str] = []
    for name, info in (model or RuntimeConfig).model_fields.items():
        ann = _unwrap_optional(info.annotation)
        section = isinstance(ann, type) and issubclass(ann, BaseModel)
        out += leaf_fields(ann, f"{prefix}{name}.") if section else [prefix + name]
    return out


if __name__ == "__main__":  # pragma: no cover - `python -m expertflow.config` prints the schema
    print(json.dumps(config_json_schema(), indent=2))
