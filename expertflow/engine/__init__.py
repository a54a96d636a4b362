"""The graph engine: decode as one CUDA graph per step, experts through a device address table,
cache decisions one step behind (see engine.py)."""

from .engine import GenerationOutput, GraphEngine, attach, device_adaptive_k
from .replay import EngineReplay, replay_generate

__all__ = ["EngineReplay", "GenerationOutput", "GraphEngine", "attach", "device_adaptive_k", "replay_generate"]
