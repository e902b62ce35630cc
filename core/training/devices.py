"""Where this process trains: its device, its rank among the processes of a run, and the sums they share.

A run in one process is rank 0 of 1 and every sum is its own value; under `accelerate launch`
(core.training.distributed) each process has a GPU of its own, or they meet over gloo on the CPU.
"""

from __future__ import annotations

import os

import psutil
import torch


def device() -> torch.device:
    """This process's device: under `accelerate launch` each process has a GPU of its own (LOCAL_RANK)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device()) for k, v in batch.items()}


def world() -> tuple[int, int]:
    """(rank, number of processes) of a distributed run; (0, 1) for a run in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float], world: int) -> list[float]:
    """The element-wise sum of `values` over all processes (itself in a single process)."""
    if world == 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(total)
    return total.tolist()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the adapter gradients over all processes (one flat all-reduce; a LoRA adapter is small)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for param, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        param.grad = chunk.view_as(param).clone()


def peak_memory_mb(peak: float) -> float:
    """The most memory the run has held so far: CUDA's allocator peak, else the process's resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return max(peak, psutil.Process().memory_info().rss / 2**20)
