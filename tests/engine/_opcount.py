"""A CPU proxy for kernels per decode step: the aten ops one step dispatches, plus Triton launches.

Views, allocations and ops on meta tensors launch no kernel on a GPU and are counted apart. Under
TRITON_INTERPRET=1 a Triton kernel runs as many aten ops on CPU: each launch counts once, as
`triton:<kernel>`, and the ops inside it are not counted.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

VIEWS = {"view", "t", "slice", "select", "transpose", "unsqueeze", "alias", "expand", "_unsafe_view",
         "as_strided", "permute", "split", "split_with_sizes", "squeeze", "unbind", "_reshape_alias"}
NO_KERNEL = {"empty", "empty_strided", "empty_like", "promote_types", "lift_fresh", "detach"}


class OpCounter(TorchDispatchMode):
    active: OpCounter | None = None

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if not (tensors and all(t.device.type == "meta" for t in tensors)):
            self.ops[str(func)] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        OpCounter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        OpCounter.active = None
        return super().__exit__(*exc)

    def kernels(self) -> Counter:
        """The ops that launch a kernel on a GPU (Triton launches included), by name."""
        out = Counter()
        for name, n in self.ops.items():
            op = name.split(".")[1] if name.startswith("aten.") else name
            if op not in VIEWS and op not in NO_KERNEL:
                out[name] += n
        return out


def count_triton_launches() -> None:
    """Count each interpreted Triton launch once (call before any kernel runs)."""
    import triton.runtime.interpreter as ti

    run = ti.InterpretedFunction.run
    if getattr(run, "counted", False):
        return

    def counted(self, *args, **kwargs):
        if OpCounter.active is not None:
            OpCounter.active.ops["triton:" + self.fn.__name__] += 1
        with _disable_current_modes():
            return run(self, *args, **kwargs)
    counted.counted = True
    ti.InterpretedFunction.run = counted


def count_decode_step(engine, input_ids: torch.Tensor, steps: int = 3) -> tuple[Counter, object]:
    """Kernel-launching ops of the last decode step of engine.generate(input_ids, steps)."""
    own = engine._decode_step
    seen = []

    def step():
        with OpCounter() as c:
            own()
        seen.append(c.kernels())
    engine._decode_step = step
    try:
        out = engine.generate(input_ids, steps, keep_logits=True)
    finally:
        del engine._decode_step
    return seen[-1], out
