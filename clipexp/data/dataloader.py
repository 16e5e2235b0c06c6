"""Batches: ``collate_fn`` and DataLoader construction.

:func:`build_loader` is the one place a DataLoader is built; ``create_dataloader`` (the original notes' call) is a
façade over it with the trainer's defaults:

* ``num_workers=None`` (and no ``config.num_workers``): :func:`default_num_workers`, the trainer's rule.
* ``persistent_workers`` whenever there are workers (no re-fork and re-pickle every epoch).
* ``pin_memory`` only when CUDA is available (pinning is useless on CPU and unsupported on MPS).
* Shuffling uses a ``torch.Generator`` seeded with ``seed`` (default ``config.seed`` or 0): the same
  seed gives the same order. A ``sampler`` (e.g. the trainer's resumable one) is passed through and
  turns ``shuffle`` off.
* Remember ``dataset.set_epoch(epoch)`` before each epoch for fresh, reproducible augmentation.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def collate_fn(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack item dicts into a batch dict with the same keys (non-tensors become lists)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    from clipexp.data.dataset import main_process_single_thread

    out: Dict[str, Any] = {}
    with main_process_single_thread():
        for key in items[0]:
            values = [it[key] for it in items]
            out[key] = _stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def _stack(values: List[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, keeping channels-last images (``[C, H, W]`` with ``[H, W, C]`` memory, as clipexp's
    transforms return them) channels-last: a straight copy into a ``[B, C, H, W]`` batch with
    ``torch.channels_last`` memory, where stacking into standard layout would transpose every image (the
    normaliser's float copy then reads the channels-last batch, and on a GPU transposes for free)."""
    first = values[0]
    if first.dim() == 3 and first.shape[0] > 1 and first.permute(1, 2, 0).is_contiguous():
        return torch.stack([v.permute(1, 2, 0) for v in values]).permute(0, 3, 1, 2)
    return torch.stack(values)


def default_num_workers(cores: Optional[int] = None, device_type: str = "cuda") -> int:
    """Loader workers when ``data.num_workers`` (or ``num_workers``) is not set.

    On an accelerator: half the cores (at least 1 from 2 cores, at most 4), so augmentation runs beside the
    device step. On CPU: none below 4 cores (items are built in the main process between steps, where the step
    has every core), a quarter of the cores from 4 (at most 4). Inside a launcher's worker process (joblib/loky):
    0, since nested loader processes are not allowed there. ``cores``: the cores this process may use (default:
    all; under torchrun, its share of the node)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return 0
    cores = cores or os.cpu_count() or 1
    if device_type == "cpu":
        return 0 if cores < 4 else min(4, cores // 4)
    return 0 if cores < 2 else min(4, max(1, cores // 2))


def _ignore_interrupts(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which finishes its step, saves and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(dataset: Dataset, *, batch_size: Optional[int] = 1, sampler: Optional[Sampler] = None, batch_sampler: Any = None,
                 shuffle: bool = False, num_workers: int = 0, seed: int = 0, drop_last: bool = False, pin_memory: bool = False,
                 prefetch_factor: Optional[int] = None, collate: Any = collate_fn, loader_class: type = DataLoader, **extra: Any) -> DataLoader:
    """The one place clipexp builds a DataLoader (training, evaluation, the notes' ``create_dataloader``, shards).

    Workers are persistent (started once, not again every epoch) and ignore Ctrl-C; shuffling draws from a
    ``torch.Generator`` seeded with ``seed``, so the same seed gives the same order (with a sampler, the sampler
    decides the order). Each ``iter()`` draws its workers' base seed from that generator too, so building or
    starting a loader never moves torch's global generator."""
    kwargs: Dict[str, Any] = dict(extra)
    if num_workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=_ignore_interrupts)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    if batch_sampler is not None:
        kwargs["batch_sampler"] = batch_sampler
    else:
        kwargs.update(batch_size=batch_size, shuffle=bool(shuffle) and sampler is None, sampler=sampler, drop_last=drop_last)
    # its own generator, always: each iter() draws its workers' base seed from it, never from torch's global one (the
    # one dropout draws from: an evaluation, or a loader started again on resume, would shift the masks of later steps)
    kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))
    return loader_class(dataset, num_workers=int(num_workers), collate_fn=collate, pin_memory=bool(pin_memory), **kwargs)


def create_dataloader(
    dataset: Dataset,
    config: Any = None,
    batch_size: int = 8,
    shuffle: Optional[bool] = None,
    num_workers: Optional[int] = None,
    drop_last: bool = False,
    sampler: Optional[Sampler] = None,
    seed: Optional[int] = None,
    *,
    pin_memory: Optional[bool] = None,
    prefetch_factor: Optional[int] = None,
    collate: Any = collate_fn,
) -> DataLoader:
    """A DataLoader over a CLIP dataset (rules in the module doc).

    ``shuffle=None``: ``config.shuffle`` when a config is given, else True. ``config`` is a
    :class:`~clipexp.config.notes.CLIPFinetuningConfig` (``batch_size`` is taken from the argument).
    """
    if shuffle is None:
        shuffle = bool(getattr(config, "shuffle", True)) if config is not None else True
    if num_workers is None:
        num_workers = getattr(config, "num_workers", None)
    if num_workers is None:
        accelerator = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        num_workers = default_num_workers(device_type=accelerator)
    if seed is None:
        seed = int(getattr(config, "seed", 0) or 0)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return build_loader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=num_workers, seed=seed,
                        drop_last=drop_last, pin_memory=pin_memory, prefetch_factor=prefetch_factor, collate=collate)


def create_train_val_dataloaders(
    train_dataset: Dataset,
    val_dataset: Optional[Dataset],
    config: Any = None,
    batch_size: int = 8,
    *,
    num_workers: Optional[int] = None,
    seed: Optional[int] = None,
) -> Tuple[DataLoader, Optional[DataLoader]]:
    """Train loader (shuffled per ``config.shuffle``) and val loader (in order, never dropping)."""
    train = create_dataloader(train_dataset, config, batch_size, shuffle=None, num_workers=num_workers, seed=seed)
    val = None
    if val_dataset is not None:
        val = create_dataloader(val_dataset, config, batch_size, shuffle=False, num_workers=num_workers, seed=seed)
    return train, val
