"""Which device a stage runs on, and the process group under ``torchrun``.

``resolve_device("auto")`` is ``cuda:<LOCAL_RANK>`` when CUDA is present, else
``cpu``. Under torchrun every rank must pin its own GPU *before* any model or
tensor moves (``"cuda"`` alone means cuda:0 on every rank), so the resolver
calls ``torch.cuda.set_device`` itself.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from vitrim.pipeline.core.errors import UserError


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(setting: str = "auto") -> str:
    """``auto|cpu|cuda|cuda:N`` -> a concrete device string; pins this rank's GPU."""
    if setting == "cpu":
        return "cpu"
    if setting == "auto" and not torch.cuda.is_available():
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError("config", f"device={setting} but no CUDA device is visible",
                        "use device: auto or cpu, or run on a GPU machine")
    _, world, local = dist_info()
    if ":" in setting and world > 1:
        raise UserError("config", f"device={setting} pins one GPU, but torchrun started {world} ranks",
                        "use device: cuda (or auto): each rank takes cuda:<LOCAL_RANK>")
    index = int(setting.split(":", 1)[1]) if ":" in setting else (local if world > 1 else torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise UserError("config", f"device cuda:{index} does not exist ({torch.cuda.device_count()} visible)",
                        "lower --nproc_per_node or check CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def init_distributed(device: str) -> tuple[int, int]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); (rank, world).

    The group vitrim creates is destroyed when the process exits: a gloo or NCCL
    group left to the C++ static destructors aborts the rank ("terminate called
    without an active exception") when one rank finishes before another.
    """
    rank, world, _ = dist_info()
    if world > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        atexit.register(shutdown_distributed)
    return rank, world


def shutdown_distributed() -> None:
    """Leave the process group (a no-op outside one); safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_device(device: str) -> torch.device:
    """Where tensors for collectives must live: NCCL reduces only CUDA tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(device if device.startswith("cuda") else f"cuda:{torch.cuda.current_device()}")
    return torch.device("cpu")


def mean_over_ranks(value: float, device: str) -> float:
    """The mean of a scalar across ranks (the value itself in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def apply_threads(threads: int | None, log=print) -> None:
    """``runtime.threads``: torch's intra-op threads for training and the search (None: torch's default)."""
    if threads is None:
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log(f"[runtime] torch intra-op threads: {threads} (runtime.threads)")
