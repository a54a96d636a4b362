"""The scheduler's torch-free decision core: adaptive-k, eviction, prefetch planning.

The runtime (expertflow.runtime) and the simulator (tuner.simulator) both call this code.
"""

from .adaptive_k import apply as apply_adaptive_k
from .adaptive_k import keep_mask
from .counters import Counters
from .policies import EvictionPolicy, ExpertStats, make_policy, policy_names, register_policy
from .plan import LayerPlan, Load, Route, SchedulerParams, Wave, allocate_capacity
from .scheduler import Scheduler

__all__ = [
    "Counters", "EvictionPolicy", "ExpertStats", "LayerPlan", "Load", "Route", "Scheduler", "SchedulerParams",
    "Wave", "allocate_capacity", "apply_adaptive_k", "keep_mask", "make_policy", "policy_names",
    "register_policy",
]
