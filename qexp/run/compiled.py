"""``compile=true``: the training forward and backward (the model with the method's quantizers: fake
quantization, straight-through and WAGE's custom autograd functions) through ``torch.compile``.

Why here and not in the methods: a method only defines the computation; whether it runs eagerly or
compiled is how the run is executed, like ``threads`` (so ``compile`` is not part of the run's
folder or resume check). The method's per-step hooks (rounding after the optimizer step, WAGE's update)
stay eager; the fused SR kernel (:func:`qexp.quant.kernels.use_fused`) is switched on with it.

``cuda_graphs=true`` (with ``compile=true``, on CUDA) compiles in torch.compile's ``reduce-overhead``
mode: the compiled forward and backward are recorded once per shape as CUDA graphs and replayed, one
launch each instead of one per kernel, which is what a small network's step is bound by on a GPU. A
graph the compiler cannot record (it reports why under ``TORCH_LOGS=perf_hints``) runs as plain
compiled code; the run says how many in one warning and in metrics.json (``cuda_graph_skips``).

A platform without a working compiler (no C++ compiler for Inductor on CPU, no Triton on CUDA) is a user
error found before training starts. A model the compiler cannot handle falls back to eager with one
warning. Compilation is lazy (first step, and again for a new batch shape or eval mode); its time is
counted apart (:class:`CompileClock`) and left out of the epoch's ``images_per_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError

log = logging.getLogger("qexp")


def check(device: torch.device, compile: bool, cuda_graphs: bool, data_parallel: bool) -> None:
    """The one-line refusals of ``compile`` / ``cuda_graphs`` before any folder is made (exit 2)."""
    if cuda_graphs:
        why = ("it works through torch.compile: add compile=true" if not compile
               else f"it needs a CUDA device (device={device})" if device.type != "cuda"
               else "trainer.devices > 1 (data parallelism)" if data_parallel else None)
        if why is not None:
            raise QexpError(f"cuda_graphs=true: {why}")
    if compile:
        check_compiler(device)


def graph_skips() -> int:
    """How many compiled graphs torch.compile has run without CUDA graphs in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def check_compiler(device: torch.device) -> None:
    """Raise a one-line :class:`QexpError` when ``torch.compile`` cannot generate code for ``device``."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise QexpError("compile=true on CUDA needs Triton (pip install triton); or run with compile=false")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()  # runs `$CXX --version` (default g++); raises when none works
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QexpError(f"compile=true needs a working C++ compiler for torch.compile on CPU ({first}); "
                        "install one (g++/clang) or run with compile=false") from None


class CompileClock:
    """Seconds spent compiling (Dynamo, Inductor, lazily compiled backward) since :meth:`start`."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0: float | None = None

    def start(self) -> CompileClock:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._begin)
        callback_handler.register_end_callback(self._end)
        return self

    def stop(self) -> None:
        from torch._dynamo.callback import callback_handler

        for register, fn in ((callback_handler.remove_start_callback, self._begin),
                             (callback_handler.remove_end_callback, self._end)):
            try:
                register(fn)
            except ValueError:
                pass

    def _begin(self, args: Any) -> None:
        with self._lock:
            self._t0 = time.perf_counter()

    def _end(self, args: Any) -> None:
        with self._lock:
            if self._t0 is not None:
                self.seconds += time.perf_counter() - self._t0
                self._t0 = None


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


@torch.library.custom_op("qexp::max_pool2d", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _max_pool2d(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                dilation: list[int], ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's max-pool with indices, opaque to Inductor (called as is, not re-generated)."""
    return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)


@_max_pool2d.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):  # noqa: ANN001, ANN202
    return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.custom_op("qexp::max_pool2d_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _max_pool2d_grad(grad: torch.Tensor, x: torch.Tensor, kernel_size: list[int], stride: list[int],
                     padding: list[int], dilation: list[int], ceil_mode: bool, idx: torch.Tensor) -> torch.Tensor:
    """ATen's max-pool backward, opaque to Inductor like the forward."""
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel_size, stride, padding, dilation,
                                                           ceil_mode, idx)


@_max_pool2d_grad.register_fake
def _(grad, x, kernel_size, stride, padding, dilation, ceil_mode, idx):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


def _max_pool2d_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode = inputs
    ctx.save_for_backward(x, output[1])


def _max_pool2d_backward(ctx, grad_out, grad_idx):  # noqa: ANN001, ANN202
    x, idx = ctx.saved_tensors
    g = _max_pool2d_grad(grad_out.contiguous(), x, ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation,
                         ctx.ceil_mode, idx)
    return g, None, None, None, None, None


_max_pool2d.register_autograd(_max_pool2d_backward, setup_context=_max_pool2d_setup)


def max_pools_as_aten_ops(module: nn.Module) -> None:
    """Run max-pooling layers with ATen's kernels inside a compiled CPU model.

    Why: Inductor's CPU kernels for max-pool with indices and its backward (window-scanning loops,
    fused with the ReLU around them) measured 2-3x slower than ATen's, which made LeNet-5 steps 0.67x
    eager. A 2-D pool becomes the opaque custom op ``qexp::max_pool2d`` (ATen's kernel, and the graph
    stays whole); 1-D/3-D pools are left to Dynamo as graph breaks. A graph break inside an
    ``nn.Sequential`` (LeNet-5's features) made Dynamo compile every later layer as its own frame with
    dynamic shapes (slow generic kernels: compiled STE steps were 0.69x eager; BENCHMARKS.md).
    """
    for m in module.modules():
        if "forward" in m.__dict__:
            continue
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            m.forward = _pool_forward(m)
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            m.forward = torch._dynamo.disable(m.forward)


def _pool_forward(m: nn.MaxPool2d) -> Any:
    k, p, d = _pair(m.kernel_size), _pair(m.padding), _pair(m.dilation)
    s = _pair(m.stride) if m.stride is not None else k

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _max_pool2d(x, k, s, p, d, m.ceil_mode)[0]

    return forward


def compile_options(cuda_graphs: bool) -> dict[str, Any]:
    """Inductor's options for the model: ``fallback_random`` makes random operations inside the graph
    (dropout) draw from torch's generator as eager code does, so a compiled run draws the same masks as
    the eager run it answers for (Inductor's own Philox stream gave 5.9% vs 9.4% on a tiny MLP with
    dropout); ``cuda_graphs`` adds what the ``reduce-overhead`` mode sets."""
    from torch._inductor import list_mode_options

    return {"fallback_random": True, **(list_mode_options("reduce-overhead") if cuda_graphs else {})}


class Compiled(nn.Module):
    """``module`` through ``torch.compile``; on a compile failure one warning, then eager for good.

    Holds the eager module as a child (so ``state_dict`` / ``parameters`` are the module's own); only
    ``forward`` goes through the compiled wrapper. ``ready()`` (the method's
    :meth:`~qexp.methods.base.Method.compile_ready`, handed over by the run session) keeps the whole
    forward eager while it is false (a one-off warm-up such as a calibration on the first batch); once
    true it is not asked again.

    ``cuda_graphs``: the ``reduce-overhead`` mode (module doc). Every call then starts a new CUDA-graph
    generation (``cudagraph_mark_step_begin``): the previous call's outputs, which live in the graphs'
    memory pool, may be overwritten from then on, so a caller reads its logits before the next forward
    (the engine does). :meth:`graph_skips` counts the graphs run without CUDA graphs since construction.
    """

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu",
                 ready: Callable[[], bool] | None = None, cuda_graphs: bool = False) -> None:
        super().__init__()
        if torch.device(device).type == "cpu":
            max_pools_as_aten_ops(module)
        self.module = module
        # a plain attribute, not a child module: state_dict/parameters stay the module's own
        object.__setattr__(self, "_compiled", torch.compile(module, options=compile_options(cuda_graphs)))
        self.failed = False
        self._ready = ready
        self.cuda_graphs = cuda_graphs
        self._skips0 = graph_skips()

    def graph_skips(self) -> int:
        """Compiled graphs (forward, backward, eval: each shape) run without CUDA graphs since this wrapper
        was made (0 without ``cuda_graphs``)."""
        return graph_skips() - self._skips0 if self.cuda_graphs else 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._ready is not None and self._ready():
            self._ready = None
        if self.failed or self._ready is not None:
            return self.module(*args, **kwargs)
        try:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(*args, **kwargs)
        except Exception as e:  # the compiler could not handle this model: eager from now on
            self.failed = True
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            log.warning("compile=true: torch.compile failed (%s: %s); training eagerly", type(e).__name__, first)
            return self.module(*args, **kwargs)
