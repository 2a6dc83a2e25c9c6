"""Device and backend selection, and the CPU layer that lets real Megatron-Core run without CUDA.

On a machine with CUDA nothing here changes any behaviour: `select_platform()` returns the
CUDA/NCCL platform and `apply_cpu_layer()` refuses to run. Without CUDA, Megatron-Core 0.16 still
calls CUDA-only APIs in a handful of places (buffers allocated on "cuda", the CUDA RNG tracker,
streams/events, `Tensor.type()` asserts). The CPU layer redirects exactly those call sites to
their CPU equivalents so the real parallel layers, schedules and optimizer run over gloo.

The layer is written against one megatron-core minor version and refuses any other, because the
call sites it covers are version specific.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

SUPPORTED_MCORE_PREFIX = "0.16."

_cpu_layer_applied = False


@dataclass(frozen=True)
class Platform:
    """Where tensors live and which collective backend torch.distributed uses."""

    device_type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def device(self, local_rank: int = 0) -> torch.device:
        if self.is_cpu:
            return torch.device("cpu")
        return torch.device("cuda", local_rank)


def select_platform(force_cpu: bool | None = None) -> Platform:
    """CUDA + NCCL when a GPU is visible, CPU + gloo otherwise.

    `force_cpu` (or the env var MEGATRON_RLSD_FORCE_CPU=1) picks CPU even where CUDA exists,
    which is useful for debugging the CPU path on a GPU node.
    """
    if force_cpu is None:
        force_cpu = os.environ.get("MEGATRON_RLSD_FORCE_CPU", "0") == "1"
    if torch.cuda.is_available() and not force_cpu:
        return Platform("cuda", "nccl")
    return Platform("cpu", "gloo")


# ---------------------------------------------------------------------------------------------
# The CPU layer
# ---------------------------------------------------------------------------------------------


def _is_cuda_device(device) -> bool:
    # Without CUDA, an integer device index can only mean "cuda:<index>".
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_if_cuda(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


def _redirect_device_kwarg(fn):
    """Wrap a tensor factory so `device="cuda"` (or an index) allocates on the CPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__megatron_rlsd_cpu_layer__ = True
    return wrapper


def _redirect_to(orig_to):
    """Wrap `Tensor.to` / `Module.to`: a CUDA target (positional or keyword) becomes the CPU."""

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (torch.device("cpu"),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        return orig_to(self, *args, **kwargs)

    return to


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "as_tensor", "linspace", "eye", "empty_strided", "tril_indices", "triu_indices",
)  # fmt: skip

# Tensor.type() names that Megatron's optimizer and clip_grads assert on.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class _NoopStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NoopEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoopEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _check_mcore_version() -> None:
    from megatron.core import package_info

    version = package_info.__version__
    if not version.startswith(SUPPORTED_MCORE_PREFIX):
        raise RuntimeError(
            f"megatron_rlsd's CPU layer supports megatron-core {SUPPORTED_MCORE_PREFIX}x, "
            f"found {version}; install megatron-core==0.16.1 (pip install -e '.[cpu]')"
        )


def apply_cpu_layer() -> None:
    """Redirect Megatron-Core's CUDA-only call sites to the CPU. Idempotent; CPU-only.

    Must run before Megatron-Core builds models or buffers. Refuses to run where CUDA is
    available so that it can never change behaviour on a GPU cluster.
    """
    global _cpu_layer_applied
    if _cpu_layer_applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_layer() is for machines without CUDA")
    _check_mcore_version()

    # Allocation: factories and .to()/.cuda() that name "cuda" land on the CPU. The device
    # context manager (`with torch.device("meta")`) recognises factories by identity from a
    # cached set: fill that cache with the originals before wrapping them.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _redirect_device_kwarg(getattr(torch, name)))
    torch.Tensor.to = _redirect_to(torch.Tensor.to)
    torch.nn.Module.to = _redirect_to(torch.nn.Module.to)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self

    # Device queries and synchronisation.
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda *args, **kwargs: None
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.device_count = lambda: 0
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _NoopStream
    torch.cuda.Event = _NoopEvent
    torch.cuda.current_stream = lambda *args, **kwargs: _NoopStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NoopStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0

    # RNG: the "CUDA" generator is the CPU default generator.
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    # Megatron's optimizer and grad clipping assert CUDA type names.
    orig_type = torch.Tensor.type

    @functools.wraps(orig_type)
    def tensor_type(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return orig_type(self, *args, **kwargs)

    torch.Tensor.type = tensor_type
    _cpu_layer_applied = True


def cpu_layer_applied() -> bool:
    return _cpu_layer_applied
