"""Which process of a distributed benchmark launch this is (`accelerate launch`/`torchrun`), and on
which device it trains."""

from __future__ import annotations

import os

import torch


def use_cpu() -> bool:
    """Whether the benchmark trains on the CPU: no GPU, or `--cpu`/`ACCELERATE_USE_CPU` asks for it."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "y", "on")
    return flag or not torch.cuda.is_available()


def _launched_distributed() -> bool:
    """Whether this process was started by `accelerate launch`/`torchrun` with several processes."""
    import torch.distributed as distributed

    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> tuple[int, int]:
    """`(rank, world size)` of this process: `(0, 1)` in a single process.

    Under a distributed launch this sets up Accelerate's process group (gloo on CPU, NCCL on GPU)
    if it is not up yet, so that every later collective (statistics, DDP) uses it.
    """
    if not _launched_distributed():
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu())
    return state.process_index, state.num_processes
