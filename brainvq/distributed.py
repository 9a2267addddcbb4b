"""Processes and devices: which device a process uses, and the few collective operations that make
data-parallel runs (torchrun: gloo on CPU, NCCL on CUDA) compute what one process would."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from brainvq.io_utils import RunError

DEVICES = ("auto", "cpu", "cuda")


def choose_device(name: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU; "cpu" and "cuda" as asked."""
    if not uses_cuda(name):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def uses_cuda(name: str) -> bool:
    """Whether the device `name` ("auto", "cpu", "cuda") means a GPU here (no CUDA set-up)."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but PyTorch sees no GPU here")
    return name != "cpu" and torch.cuda.is_available()


def init_distributed(name: str = "auto") -> torch.device:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); pick the device."""
    cuda = uses_cuda(name)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if cuda:
            check_one_gpu_per_process()
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return choose_device(name)


def check_one_gpu_per_process() -> None:
    """NCCL needs a GPU of its own for each process on a node: refuse more processes than GPUs
    with one line that says what to pass, before any rank touches a card."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise RunError(f"torchrun started {processes} processes on this node but it has {gpus} "
                       f"GPU(s): pass --nproc_per_node={gpus}, or --device cpu to train on the "
                       "CPU (gloo)")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def is_distributed() -> bool:
    return world()[1] > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def leave_distributed() -> None:
    """Wait for every rank, then close the process group. A rank that exits while gloo still
    holds its connections can make another rank's gloo thread abort (SIGABRT) at exit."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap in DistributedDataParallel under torchrun; the model itself otherwise."""
    if not is_distributed():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of a global batch (the whole batch on one process)."""
    rank, size = world()
    return batch.tensor_split(size)[rank] if size > 1 else batch


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sums of plain numbers over every rank (float64)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every rank, in place."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order: the global batch under torchrun."""
    if not is_distributed():
        return t
    size = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - len(t))).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank, so replicas keep identical state."""
    if is_distributed():
        dist.broadcast(t, src=0)
    return t
