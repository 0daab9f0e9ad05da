"""PyTorch distributed data parallelism, when the trainer runs under torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Every rank holds the whole model, takes its share
of each optimizer step's micro-batches, and DDP averages the gradients. Only rank 0 writes:
checkpoints, progress, the published adapter. NCCL on GPUs, gloo on CPUs, so the same path runs
in CPU tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Ranks:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks


def device_for(ranks: Ranks) -> torch.device:
    return torch.device("cuda", ranks.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        dist.barrier()


def total(value: float, ranks: Ranks) -> float:
    """The sum of `value` over all ranks."""
    if not ranks.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device_for(ranks))
    dist.all_reduce(tensor)
    return float(tensor.item())


def gathered(value: T, ranks: Ranks) -> list[T]:
    """`value` of every rank, in rank order, on every rank (any picklable value)."""
    if not ranks.enabled:
        return [value]
    values: list[T] = [None] * ranks.world_size  # type: ignore[list-item]
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """Whether `flag` is true on at least one rank; every rank gets the same answer."""
    return total(float(flag), ranks) > 0


def teardown(ranks: Ranks) -> None:
    if ranks.enabled and dist.is_initialized():
        dist.destroy_process_group()
