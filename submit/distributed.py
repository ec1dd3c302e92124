"""Where this process runs: its place in a torchrun job (rank, world size, the process group it joined), the
objects every rank shares, and how many CPU compute threads it should use."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

from submit.device import usable_cores


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; `owns_group` when `train` created the process group."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by WORLD_SIZE/RANK/LOCAL_RANK (nccl on CUDA, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_world_size(), dist.get_rank(), local, owns), device


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in a single process)."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cpu_threads(device: torch.device, workers: int) -> int:
    """On CPU, pick the compute threads: the cores this process may use, minus one per DataLoader worker
    and minus the cores other programs keep busy (1-minute load average), at least 1.

    OpenMP threads spin at barriers: when a loader worker or another program preempts one of them, a
    step can take many times longer (on a busy 2-core VM, 2 threads ran 27x slower than 1). An explicit
    OMP_NUM_THREADS always wins.
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    torch.set_num_threads(max(1, min(cores - workers, cores - busy)))
    return torch.get_num_threads()
