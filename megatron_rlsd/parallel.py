"""torch.distributed and Megatron `parallel_state` initialisation.

One launcher (torchrun) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
`init_distributed` reads them, picks the backend from the platform, applies the CPU layer when
needed and builds Megatron's tensor/pipeline/data-parallel groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_rlsd.platform import Platform, apply_cpu_layer, select_platform


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout. Data parallelism is whatever the world size leaves."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    """At TP > 1: split the activations outside attention and MLP (norms, dropout, residuals)
    along the sequence over the TP ranks, 1/TP of their memory."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Not implemented (must stay null): the trainer drives one model chunk per stage."""
    context_parallel_size: int = 1
    """Not implemented (must stay 1): the trainer does not split sequences."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline_model_parallel_size not in (None, 1):
            raise ValueError(
                "parallel.virtual_pipeline_model_parallel_size is not implemented (the trainer builds one model "
                "chunk per pipeline stage); set it to null"
            )
        if self.context_parallel_size != 1:
            raise ValueError(
                "parallel.context_parallel_size > 1 is not implemented (sequences are not split across ranks); "
                "set it to 1 and use tensor parallelism for long sequences"
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP = "
                f"{self.tensor_model_parallel_size}*{self.pipeline_model_parallel_size}; launch a multiple of "
                f"{self.model_parallel_size} processes"
            )
        return world_size // self.model_parallel_size


def init_distributed(
    parallel: ParallelConfig, platform: Platform | None = None, timeout_minutes: int = 30
) -> Platform:
    """Initialise torch.distributed (from torchrun's env vars) and Megatron's parallel groups.

    Works as a single process too (no env vars: world size 1 over a local TCP store).
    Returns the platform in use.
    """
    from megatron.core import parallel_state

    platform = platform or select_platform()
    if platform.is_cpu:
        apply_cpu_layer()

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel.data_parallel_size(world_size)  # validate before any collective is created
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not platform.is_cpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=platform.backend, timeout=timedelta(minutes=timeout_minutes))

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        )
    return platform


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (distinct streams per TP rank)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for single-process groups and test launches)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collective_device() -> torch.device:
    """Where tensors for torch.distributed collectives must live: NCCL takes CUDA tensors only,
    gloo host tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_scalar(value: float, op=dist.ReduceOp.SUM, group=None) -> float:
    """A float reduced over `group` (default: the world), on the backend's device."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=op, group=group)
    return float(t.item())
