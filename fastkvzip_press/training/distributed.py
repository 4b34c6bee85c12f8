"""Several processes of one training run (``torchrun``): which windows each rank extracts, and the process group.

Ranks come from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); without it a run is one
process, rank 0 of 1. Every rank plans the same windows (tokenizing is cheap next to the model's forwards) and extracts
those whose position ``p`` has ``p % world_size == rank``, so the shard files are exactly those of one process. The
fit and the export run once, on rank 0, after every rank's shards are on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Extraction of one window can take minutes on a CPU; ranks wait at most this long for each other.
BARRIER_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, position: int) -> bool:
        """Whether this rank extracts the window at ``position`` of the planned order."""
        return position % self.world_size == self.rank

    @classmethod
    def from_environment(cls) -> Ranks:
        """The ranks torchrun set in the environment (one process, rank 0 of 1, without it)."""
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as error:
            raise ValueError(
                f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them): {error}"
            ) from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} outside WORLD_SIZE={world_size}")
        return cls(rank, world_size, local_rank)

    def device(self, requested: str | None = None) -> torch.device:
        """Where this rank's model runs: ``requested`` as given (``"cuda"`` without an index means this rank's GPU,
        ``cuda:<local rank>``); by default this rank's GPU where CUDA is available, else the CPU."""
        if requested is None:
            return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        return device


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the run's process group (NCCL for CUDA devices, gloo otherwise) for the block, when there are several
    ranks and none was set up by the caller; leave it afterwards."""
    own = ranks.distributed and not dist.is_initialized()
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's barrier runs on the current device: this rank's own
            dist.init_process_group(
                "nccl", rank=ranks.rank, world_size=ranks.world_size, timeout=BARRIER_TIMEOUT, device_id=device
            )
        else:
            dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (a no-op for one process)."""
    if ranks.distributed and dist.is_initialized():
        dist.barrier()
