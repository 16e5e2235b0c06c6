"""Out-of-memory errors: recognise one, give the memory back, and recover mid-run.

* :func:`is_oom` / :func:`free_memory`: an out-of-memory error on CUDA, MPS or CPU, and the memory back.
* :class:`OOMRecovery` + :func:`split_batch`: when a step runs out of memory, halve the micro-batch and
  double the accumulation, keeping the logical batch (and, with GradCache, the exact gradient of it).
"""

from __future__ import annotations

import gc
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# Recognising an OOM
# --------------------------------------------------------------------------------------------------

_OOM_MESSAGES = (
    "out of memory",  # "CUDA out of memory", "MPS backend out of memory", "XPU out of memory"
    "can't allocate memory",  # "[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means "this does not fit in memory" (and a smaller batch may).

    ``torch.OutOfMemoryError`` (= ``torch.cuda.OutOfMemoryError``), Python's ``MemoryError``, and a
    ``RuntimeError`` whose message says out of memory: CUDA, MPS ("MPS backend out of memory"), the CPU
    allocator ("DefaultCPUAllocator: can't allocate memory") and cuBLAS / cuDNN allocation failures.
    """
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, RuntimeError):
        message = str(err).lower()
        return any(m in message for m in _OOM_MESSAGES)
    return False


def free_memory(device: Union[str, torch.device, None] = None) -> None:
    """``gc.collect()`` then give cached blocks back: CUDA and/or MPS (``device=None``: whichever exist)."""
    gc.collect()
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch.backends, "mps", None)
    if kind in (None, "mps") and mps is not None and mps.is_available():
        torch.mps.empty_cache()



class BatchTooLargeError(RuntimeError):
    """Even a micro-batch of one sample does not fit. One line with what to change."""


# --------------------------------------------------------------------------------------------------
# Recovering from an OOM mid-run
# --------------------------------------------------------------------------------------------------


def split_batch(batch: Dict[str, Any], micro: int) -> List[Dict[str, Any]]:
    """Split a logical batch into consecutive micro-batches of ``micro`` samples (the last may be smaller).

    Tensors and lists/tuples whose first dimension is the batch size are sliced; any other value
    (metadata) is shared by every micro-batch. Concatenating the pieces in order gives the batch back.
    With a plain (averaged) accumulation, weight each micro-batch's loss by its size over the total.
    """
    if micro < 1:
        raise ValueError(f"micro-batch size must be >= 1; got {micro}")
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors must share their first dimension; got sizes {sorted(sizes)}")
    total = sizes.pop()

    def sliceable(v: Any) -> bool:
        return (torch.is_tensor(v) and v.dim() > 0) or (isinstance(v, (list, tuple)) and len(v) == total)

    return [{k: (v[a:a + micro] if sliceable(v) else v) for k, v in batch.items()} for a in range(0, total, micro)]


class OOMRecovery:
    """Halve the micro-batch, keep the logical batch: ``micro * accum >= logical_batch`` always.

    ``on_oom()`` sets ``micro = ceil(micro / 2)``, ``accum = ceil(logical_batch / micro)`` and returns
    ``(micro, accum)``; at micro-batch 1 it raises a ``RuntimeError`` saying what to change. Feed the
    step with ``split_batch(logical_batch_dict, recovery.micro)`` (``accum`` pieces; with
    :func:`clipexp.training.gradcache.exact_accumulation_step` the gradient does not change at all).

    :meth:`run` does the retry loop: it calls ``step(micro_batches)`` and, on an OOM, runs ``cleanup``
    (e.g. ``optimizer.zero_grad(set_to_none=True)``: a half-done backward left partial gradients) and
    :func:`free_memory`, halves, and tries the same logical batch again.
    """

    def __init__(self, micro_batch: int, accumulation: int = 1, logical_batch: Optional[int] = None,
                 device: Union[str, torch.device, None] = None):
        if micro_batch < 1 or accumulation < 1:
            raise ValueError(f"micro_batch and accumulation must be >= 1; got {micro_batch}, {accumulation}")
        self.micro = int(micro_batch)
        self.accum = int(accumulation)
        self.logical_batch = int(logical_batch) if logical_batch is not None else self.micro * self.accum
        self.device = device
        self.history: List[Tuple[int, int]] = [(self.micro, self.accum)]

    def on_oom(self) -> Tuple[int, int]:
        if self.micro <= 1:
            raise BatchTooLargeError(
                f"out of memory at micro-batch 1 (logical batch {self.logical_batch}); use a smaller model or "
                f"image_resolution, set model.gradient_checkpointing=true, lock a tower, or use bf16/fp16"
            )
        self.micro = math.ceil(self.micro / 2)
        self.accum = math.ceil(self.logical_batch / self.micro)
        self.history.append((self.micro, self.accum))
        log.warning("out of memory: micro-batch now %d x %d accumulation (logical batch %d)",
                    self.micro, self.accum, self.logical_batch)
        return self.micro, self.accum

    def run(self, step: Callable[[List[Dict[str, Any]]], T], batch: Dict[str, Any],
            cleanup: Optional[Callable[[], Any]] = None) -> T:
        while True:
            failed = False
            try:
                return step(split_batch(batch, self.micro))
            except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
                if not is_oom(err):
                    raise
                failed = True
            if failed:  # outside the except block: the failed step's frames (and tensors) are gone
                if cleanup is not None:
                    cleanup()
                free_memory(self.device)
                self.on_oom()

    def state_dict(self) -> Dict[str, int]:
        return {"micro": self.micro, "accum": self.accum, "logical_batch": self.logical_batch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.micro, self.accum, self.logical_batch = int(state["micro"]), int(state["accum"]), int(state["logical_batch"])
