"""Count the kernels a piece of training code launches: the GPU cost of small networks, measured anywhere.

Why: a small network's training step on a GPU is bound by kernel launches (a few microseconds each), so
a quantizer that adds one small kernel per layer and pass costs as much as the layer's math. Which ATen
operators a step dispatches is the same on a CPU, so counting them here says how many kernels the GPU
will be asked to launch, without one, and a test can hold that number (tests/test_launches.py).

Counted: every operator that computes (one launch each; a ``_foreach_*`` call over many tensors is one
launch, as CUDA's multi-tensor kernels take ~100 tensors per launch). Not counted: views
(``_unsafe_view`` too), allocations (``empty*``), profiler markers, and ``_local_scalar_dense`` (a host
read of a device value: a synchronisation on a GPU), which is counted apart as ``host_reads``. A proxy:
a cuDNN convolution may launch a few kernels, and a
path taken only on CUDA (a Triton kernel) is not seen on CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

#: operators that allocate or read back, launching no kernel
_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
                        "set_", "resize_", "_local_scalar_dense", "_unsafe_view", "_reshape_alias"})


class LaunchCounter(TorchDispatchMode):
    """Inside ``with LaunchCounter() as c:``, ``c.ops`` counts launches per operator and ``c.host_reads``
    the device values read on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        space, _, name = func._schema.name.rpartition("::")
        if space == "profiler":  # record_function markers
            pass
        elif name == "_local_scalar_dense":
            self.host_reads += 1
        elif name not in _NO_KERNEL and not func.is_view:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Counter[str]:
    """The launches of one call ``fn(*args, **kwargs)``, per operator."""
    with LaunchCounter() as c:
        fn(*args, **kwargs)
    return c.ops
