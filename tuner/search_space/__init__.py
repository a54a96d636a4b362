"""Search spaces: YAML files keyed by dotted RuntimeConfig paths, validated strictly on load.

File format (version 1):

    version: 1
    description: free text
    params:
      adaptive_k.threshold:  {type: float, low: 0.5, high: 1.0, step: 0.05}
      cache.capacity_experts: {type: int, low: layers, high: budget}
      cache.policy:          {type: categorical, choices: [lru, lfu, static, expertflow]}
      prefetch.adaptive:     {type: bool}
      cache.expertflow.decay: {type: float, low: 0.8, high: 0.99, when: {cache.policy: expertflow}}

* every key is a scalar field of `expertflow.config.RuntimeConfig` that the tuner may change
  (not model.*, memory.*, hardware.*, provenance.*, runtime.device/dtype/record_trace);
* `type` matches the field: int/float for numbers (or categorical of numbers), bool, and
  categorical for Literal fields (choices among the allowed values);
* `low`/`high` are numbers, a symbol, or NUMBER*SYMBOL; symbols are resolved at study time
  (`SYMBOLS`), then every bound is checked against the field's allowed range;
* `step` (grid) and `log` (log scale) as in Optuna, not both;
* `when: {other.key: value | [values]}` samples the parameter only when an unconditional
  categorical/bool parameter has one of those values (else the config keeps its value).

Errors raise `ConfigError` naming the file, the key, the value and what is allowed.
"""

from .model import FIXED, PARAM_KEYS, SPACE_VERSION, SYMBOLS, TYPES, Param, SearchSpace
from .optuna_adapter import suggest
from .parsing import load_space, packaged_space, parse_space

__all__ = ["FIXED", "PARAM_KEYS", "SPACE_VERSION", "SYMBOLS", "TYPES", "Param", "SearchSpace", "load_space",
           "packaged_space", "parse_space", "suggest"]
