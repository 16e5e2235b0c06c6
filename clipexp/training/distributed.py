"""Process-group plumbing for ``torchrun`` (DistributedDataParallel); the identity in one process.

``torchrun --nproc_per_node=N -m clipexp ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in their environment. :func:`init_distributed`
reads them, starts the process group (NCCL for CUDA, Gloo for CPU) with a timeout on every
collective, pins each process to its GPU, and returns a :class:`DistContext`. Without those variables
(or with ``WORLD_SIZE=1``) nothing is started and every helper of the context is the identity: a
single process runs exactly the code it always ran.

A sweep job that the ``submitit_slurm`` launcher starts as several SLURM tasks (``tasks_per_node``
> 1) gets the same variables from :func:`export_submitit_env`.

The helpers name the few calls the trainer makes whether or not it is distributed: collectives
(``barrier``, ``broadcast``, ``gather``, ``average_gradients``), DDP wrapping and gradient sync
(``wrap``, ``gradient_sync``), sharded evaluation (``shard``, ``gather_in_order``), and a best-effort
side channel in the rendezvous store through which a rank
that fails (or is interrupted) tells the others why (:meth:`DistContext.report` /
:meth:`DistContext.reported_elsewhere`), so the job ends with one clear line instead of N stack
traces or a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800
_NOTE_KEY = "clipexp/{}/{}"  # (kind, rank): "failed" or "interrupted"
_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. The default is a single process (world size 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        """True when there are several processes (a process group is running)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs to MLflow and prints."""
        return self.rank == 0

    @property
    def device(self) -> Optional[torch.device]:
        """This process's GPU under NCCL (``cuda:<local_rank>``, set current by :func:`init_distributed`);
        None otherwise (the trainer's choice)."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None

    # ------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (one all-reduce of one number; ``flag`` itself in one process)."""
        if not self.enabled:
            return bool(flag)
        box = torch.tensor([1.0 if flag else 0.0], device=self.device or torch.device("cpu"))
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item() > 0)

    def gather(self, obj: Any, dst: int = 0) -> Optional[List[Any]]:
        """``[obj of rank 0, obj of rank 1, ...]`` on rank ``dst``; None on the others. Keep tensors on CPU."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Replace every ``.grad`` by its mean over the ranks (bucketed all_reduce; no-op in one process).

        Parameters whose ``.grad`` is None are skipped, so every rank must have the same set of
        gradients (true when they run the same graph).
        """
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        bucket: List[torch.Tensor] = []
        size = 0
        for g in grads:
            if bucket and (g.dtype != bucket[0].dtype or g.device != bucket[0].device or size + g.numel() * g.element_size() > _BUCKET_BYTES):
                self._all_reduce_mean(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket:
            self._all_reduce_mean(bucket)

    def _all_reduce_mean(self, grads: List[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ DDP and sharded work
    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` in DistributedDataParallel when there are several processes and it has something
        to train; ``module`` itself otherwise."""
        if not self.enabled or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        # CLIP's buffers (position ids) are constants: no buffer broadcast before every forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        device_ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=device_ids, gradient_as_bucket_view=True, **no_buffer_sync)

    @staticmethod
    def gradient_sync(module: torch.nn.Module, now: bool):
        """The context of a backward: DDP all-reduces gradients only when ``now`` (the last micro-batch
        of a step; ``no_sync`` before it). Any other module: nothing to do."""
        return contextlib.nullcontext() if now or not hasattr(module, "no_sync") else module.no_sync()

    def shard(self, n: int) -> List[int]:
        """This rank's share of ``n`` work items (item ``i`` goes to rank ``i % world_size``)."""
        return list(range(self.rank, n, self.world_size))

    def gather_in_order(self, parts: Sequence[Tuple[int, Any]]) -> Optional[List[Any]]:
        """Every rank's ``(index, value)`` parts on rank 0, as values sorted by index (None elsewhere):
        with :meth:`shard`, the values one process would have made, in its order."""
        gathered = self.gather(list(parts))
        if gathered is None:
            return None
        return [value for _, value in sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])]

    # ------------------------------------------------------------------- failures across ranks
    def report(self, kind: str, message: str) -> None:
        """Leave a note (``kind``: ``failed`` or ``interrupted``) in the rendezvous store for the other
        ranks, before this one exits (best effort, never raises)."""
        if not self.enabled:
            return
        try:
            dist.distributed_c10d._get_default_store().set(_NOTE_KEY.format(kind, self.rank), message)
        except Exception:  # noqa: BLE001 - the store may be gone with the job; the note is a courtesy
            pass

    def reported_elsewhere(self, kind: str) -> Optional[str]:
        """The note of that ``kind`` left by another rank, if any (best effort, never raises)."""
        if not self.enabled:
            return None
        try:
            store = dist.distributed_c10d._get_default_store()
            for rank in range(self.world_size):
                key = _NOTE_KEY.format(kind, rank)
                if rank != self.rank and store.check([key]):
                    return store.get(key).decode(errors="replace")
        except Exception:  # noqa: BLE001
            pass
        return None

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} (local {self.local_rank}, {self.backend})" if self.enabled else "single process"


# --------------------------------------------------------------------------------------------------
# Starting and stopping
# --------------------------------------------------------------------------------------------------


def export_submitit_env() -> None:
    """Inside a multi-task SLURM job started by submitit (Hydra's ``submitit_slurm`` launcher with
    ``tasks_per_node`` > 1), export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
    as torchrun would. Does nothing elsewhere, or when torchrun's variables are already there."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun / submitit)."""
    export_submitit_env()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


_timeout_s: float = DEFAULT_TIMEOUT_S  # the running group's collective timeout (set by init_distributed)


def current() -> DistContext:
    """The context of the running process group, or a single-process context when there is none."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistContext()
    backend = dist.get_backend()
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        backend=str(backend), timeout_s=_timeout_s,
    )


def backend_for(device_type: str) -> str:
    """NCCL when the run will be on CUDA (``device.type`` cuda, or auto with a GPU), else Gloo."""
    wants_cuda = device_type == "cuda" or (device_type == "auto" and torch.cuda.is_available())
    return "nccl" if wants_cuda and torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_distributed(device_type: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Start the process group from torchrun's environment; return this process's context.

    Idempotent: when a group is already running (``__main__`` starts it before Hydra, so that the
    ranks can agree on one output folder) its context is returned. ``WORLD_SIZE`` unset or 1: no group,
    a single-process context. ``timeout_s`` bounds every collective: a rank that died or hangs makes
    the others fail with an error after that long instead of waiting forever.
    """
    global _timeout_s
    if dist.is_available() and dist.is_initialized():
        return current()
    if env_world_size() <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = backend_for(device_type)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":  # one GPU per process (a scheduler that binds one GPU per task shows each just its own)
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    _timeout_s = float(timeout_s)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    ctx = current()
    log.debug("process group started: %s", ctx.describe())
    return ctx


def destroy() -> None:
    """Stop the process group (after a successful run; a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_collective_error(err: BaseException) -> bool:
    """Whether ``err`` looks like a failed/timed-out collective (a peer died, hung, or the network broke)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Timed out", "timed out", "NCCL", "gloo", "Connection reset", "Broken pipe")
    )
