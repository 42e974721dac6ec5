"""torch.distributed for training and evaluation under ``torchrun``.

``torchrun --nproc_per_node N -m mulan train ...`` (or ``--nnodes``/``--rdzv-endpoint`` for several machines)
sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` then joins the process group (NCCL on CUDA, gloo on
CPU) and picks this rank's device. Without those variables everything runs as one process (rank 0 of 1) and
no collective is ever called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from mulan.errors import ConfigError, MulanError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL: this rank's GPU)

    @property
    def main(self) -> bool:
        """Rank 0: the only one that logs, prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: Tensor) -> Tensor:
        """Elementwise mean of ``values`` over ranks (``values`` itself on one process)."""
        if not self.distributed:
            return values
        out = values.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / self.size).to(values.device)

    def gather(self, values: Tensor) -> Tensor:
        """Concatenate every rank's ``values`` (same shape on every rank) in rank order, on every rank."""
        if not self.distributed:
            return values
        here = values.detach().to(self.device).contiguous()
        parts = [torch.empty_like(here) for _ in range(self.size)]
        dist.all_gather(parts, here)
        return torch.cat(parts).to(values.device)

    def batches(self, n: int, batch_size: int) -> Iterator[tuple[Tensor, int]]:
        """Shard items 0..n-1 for evaluation: global batches of ``batch_size`` x ranks, each split into equal
        contiguous parts, the last padded by repeating item n-1, so every rank runs the same number of
        equally sized batches. Yields (this rank's item indices, number of real items in the global batch);
        ``gather`` the per-item results and keep the first that many."""
        step = batch_size * self.size
        for start in range(0, n, step):
            real = min(step, n - start)
            local = -(-real // self.size)
            first = start + self.rank * local
            yield torch.arange(first, first + local).clamp_max(n - 1), real

    def check_same(self, module: torch.nn.Module, what: str) -> None:
        """Raise if ``module``'s floating-point state differs between ranks (a float64 checksum per tensor)."""
        if not self.distributed:
            return
        tensors = [v for v in module.state_dict().values() if v.dtype.is_floating_point]
        sums = torch.stack([v.detach().double().sum() for v in tensors]) if tensors else torch.zeros(1)
        everyone = self.gather(sums).reshape(self.size, -1)
        if not bool((everyone == everyone[0]).all()):
            raise MulanError(f"the {what} differ between ranks: the ranks have diverged")


_WORLD = World()


def world() -> World:
    """The current job's :class:`World` (one process unless :func:`setup` joined a group)."""
    return _WORLD


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def resolve_device(name: str) -> torch.device:
    """train.device as a torch device: 'auto' picks CUDA when available; a one-line error for a bad name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available")
    return device


def _import_torch_distributed_nn() -> None:
    """Import ``torch.distributed.nn`` while no process group exists (call before creating one).

    Its functions take ``group=group.WORLD`` as default arguments, which Python evaluates when the module is
    imported. Imported after the group exists (DistributedDataParallel's constructor does, through
    ``torch._dynamo``), they hold ten references to the default group that ``destroy_process_group`` cannot
    drop: gloo's worker threads then outlive :func:`teardown` into interpreter shutdown, and a worker that
    releases its last collective's tensors there needs the GIL, gets ``pthread_exit`` inside a C++ destructor
    and aborts the rank ("terminate called without an active exception", SIGABRT).
    """
    try:
        import torch.distributed.nn  # noqa: F401
    except ImportError:  # a build without it: then nothing holds the group either
        pass


def setup(device: str = "auto", timeout_s: float = 1800.0, init_method: str | None = None) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (if any); returns this rank's world and device.

    ``device`` is train.device: 'auto' (CUDA when available), 'cpu', or 'cuda' (each rank then takes
    cuda:LOCAL_RANK). One process: the device named, no process group. ``init_method`` (e.g. a ``file://``
    rendezvous) replaces torchrun's MASTER_ADDR/MASTER_PORT; RANK and WORLD_SIZE are still read.
    """
    global _WORLD
    base = resolve_device(device)
    size = env_world_size()
    if size == 1:
        return _WORLD, base
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        base = torch.device("cuda", local)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        _import_torch_distributed_nn()
        kwargs = {"device_id": base} if base.type == "cuda" else {}
        if init_method is not None:
            kwargs.update(init_method=init_method, rank=rank, world_size=size)
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                **kwargs)
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local,
                   device=base if base.type == "cuda" else torch.device("cpu"))
    return _WORLD, base


def teardown() -> None:
    """Leave the process group. The group is destroyed here, its threads joined, while the interpreter is
    whole (see :func:`_import_torch_distributed_nn`); nothing of it may live on into interpreter shutdown."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()
