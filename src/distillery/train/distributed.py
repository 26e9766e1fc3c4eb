"""Distributed data-parallel set-up and teardown on top of ``torch.distributed`` (launched by torchrun).

    torchrun --nproc_per_node=2 -m distillery distill --teacher runs/fmnist/teacher/checkpoint.pt
    # two nodes: run on each, with --node_rank 0 on HOST and 1 on the other
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=HOST --master_port=29500 \\
             -m distillery run

torchrun starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`session` reads them, joins the process group (gloo on
CPU, nccl on CUDA, one GPU per process chosen by ``LOCAL_RANK``) and leaves it on exit. Without
those variables it does nothing and everything runs in one process as before.

What the rest of the package does with the :class:`DistContext` (see ``Trainer``):

- the student (together with the method, whose learnable parts such as a FitNets regressor must be
  synchronised too) is wrapped in ``DistributedDataParallel``: gradients are averaged over ranks;
- ``TrainConfig.batch_size`` is the *global* batch: each rank takes ``batch_size / world_size``
  examples per step (an error if not divisible), every rank's share of the same epoch permutation,
  so one step sees exactly the examples a single process would and the averaged gradient equals the
  single-process one (up to float summation order);
- train sums and test metrics are summed over ranks (the test set is sharded);
- only rank 0 writes checkpoints and metrics; the others wait at a barrier; all ranks resume from
  the same checkpoint (multi-node runs need ``output_dir`` on a shared filesystem);
- a SIGINT/SIGTERM on any rank stops every rank at the same step, after one checkpoint.

BatchNorm: each rank normalises with the statistics of its own per-rank batch, so a BN network does
not match a single-process run exactly (an MLP does); running statistics are taken from rank 0
(DDP broadcasts buffers every forward, and the trainer broadcasts them before each evaluation and
checkpoint). On CUDA, ``sync_batchnorm: true`` converts BN layers to ``SyncBatchNorm``, which
normalises over the global batch (torch supports it on GPUs only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedSetupError(ValueError):
    """The torchrun environment or the requested device cannot form a process group."""


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the group. ``DistContext()`` is the single-process case."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place, and return it (unchanged in one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's copy of a same-shaped ``tensor``, in rank order."""
        if not self.enabled:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return out

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every rank (DDP keeps the
        parameters equal; buffers updated in the last forward of each rank differ)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in module.buffers():
                dist.broadcast(tensor.data, src=0)

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then on the other ranks; each keeps its own result.

        For work that fills a shared on-disk cache: rank 0 writes it, the others then find it
        complete and only read it. If rank 0 raises, every rank raises.
        """
        if not self.enabled:
            return fn()
        kept: dict[str, T] = {}
        self.on_main(lambda: kept.update(result=fn()))  # rank 0's result stays local; its error reaches all
        return kept["result"] if self.is_main else fn()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give its result to every rank.

        If it raises, every rank raises the same exception, so all ranks report the same error and
        exit together (for decisions with side effects on shared files, such as moving a run
        folder aside).
        """
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as err:  # handed to the other ranks, then raised here too
                box[0] = ("error", err)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value


def current() -> DistContext:
    """The context of the process group this process belongs to (single-process if none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ENV_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def rank_device(name: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` in a torchrun process (one GPU per process)."""
    if name == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return name


def init(device: str, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's environment variables (no-op without them)."""
    if dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return DistContext()
    base = device.split(":")[0]
    if base not in ("cpu", "cuda"):
        raise DistributedSetupError(f"distributed training supports device cpu (gloo) or cuda (nccl), got {device!r}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if base == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError("device cuda requested but CUDA is not available; use device: cpu")
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s); "
                                        "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if base == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return current()


def shutdown(ctx: DistContext, clean: bool) -> None:
    """Leave the process group; on a clean exit wait for every rank first."""
    if not dist.is_initialized():
        return
    if clean and ctx.enabled:
        dist.barrier()
    dist.destroy_process_group()


@contextmanager
def session(device: str) -> Iterator[DistContext]:
    """``with session(config.device) as ctx:`` join the group (if launched by torchrun), then leave it."""
    started = not dist.is_initialized()
    ctx = init(device)
    clean = False
    try:
        yield ctx
        clean = True
    finally:
        if started:
            shutdown(ctx, clean)
