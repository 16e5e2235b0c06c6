"""Out-of-memory helpers and the automatic batch size: the one import for all of them.

Plain functions of plain arguments (no Hydra, no MLflow), in three modules the trainer wires together:
:mod:`clipexp.oom` (recognise and recover), :mod:`clipexp.batch_size` (probe, cache, choose) and
:mod:`clipexp.batch_estimate` (the arithmetic estimate).

* :func:`is_oom` / :func:`free_memory`: recognise an out-of-memory error on CUDA, MPS or CPU, and
  give the memory back.
* :func:`find_max_batch_size` + :func:`make_train_step_probe`: the largest micro-batch for which one
  real training step (forward, backward, optional optimizer step) fits, by doubling then bisection.
* :class:`BatchSizeCache`: probed sizes remembered in a small JSON file, per model / resolution /
  precision / device.
* :func:`estimate_batch_size`: a documented, conservative arithmetic estimate for CPU and MPS, where
  probing is slow (CPU) or an OOM may take the machine down with it (MPS).
* :func:`resolve_batch_size`: configured > cache > probe (CUDA) > estimate > fallback, and where the
  number came from.
* :class:`OOMRecovery` + :func:`split_batch`: when a step still runs out of memory mid-run, halve the
  micro-batch and double the accumulation, keeping the logical batch (and, with GradCache, the exact
  gradient of it).
"""

from __future__ import annotations

from clipexp.batch_estimate import (  # noqa: F401 - the constants are part of the documented estimate
    ACTIVATION_ELEMENTS_PER_TOKEN_WIDTH,
    ACTIVATION_SAFETY,
    ATTENTION_ELEMENTS_PER_HEAD_TOKEN_PAIR,
    AUTOCAST_BYTES_PER_PARAM,
    BYTES_PER_ACTIVATION,
    HEAD_DIM,
    MAX_ESTIMATE,
    MEMORY_FRACTION,
    STATE_BYTES_PER_PARAM,
    available_memory_bytes,
    estimate_batch_size,
    estimate_batch_size_for_model,
)
from clipexp.batch_size import (
    DEFAULT_FALLBACK,
    BatchSizeCache,
    default_cache_path,
    find_max_batch_size,
    make_train_step_probe,
    resolve_batch_size,
    train_batch_size,
)
from clipexp.oom import BatchTooLargeError, OOMRecovery, free_memory, is_oom, split_batch

__all__ = [
    "BatchSizeCache",
    "BatchTooLargeError",
    "DEFAULT_FALLBACK",
    "OOMRecovery",
    "available_memory_bytes",
    "default_cache_path",
    "estimate_batch_size",
    "estimate_batch_size_for_model",
    "find_max_batch_size",
    "free_memory",
    "is_oom",
    "make_train_step_probe",
    "resolve_batch_size",
    "split_batch",
    "train_batch_size",
]
