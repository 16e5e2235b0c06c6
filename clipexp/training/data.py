"""The trainer's data side: datasets from the run config, the epoch sampler, the loader, device batches.

``clipexp.data`` builds datasets from plain arguments; this module reads the run config for it
(:func:`build_data`), chooses loader workers and CPU threads from the cores, and turns loader batches
into the towers' inputs on the device (:class:`DeviceBatches`: uint8 pixels normalised there, captions
packed). The order of training items is :class:`EpochSampler`'s: a permutation seeded by (seed, epoch)
that can start part-way through an epoch, sliced per rank under torchrun.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Sampler

from clipexp.models.clip import pack_captions

log = logging.getLogger(__name__)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way through (exact resume).

    Yields ``num_batches * batch_size`` indices: the tail that would not fill a whole optimizer step is
    dropped, so every epoch has the same number of steps.

    Several processes (``world_size`` > 1): every rank draws the same permutation; a step takes the next
    ``batch_size * world_size`` indices of it (the global batch) and rank ``r`` yields the ``r``-th
    ``batch_size`` of them, so the ranks' batches concatenated in rank order are the global batch.
    ``start`` counts indices of the permutation (a multiple of the global batch), as in one process.
    """

    def __init__(self, n: int, batch_size: int, num_batches: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.num_batches = n, batch_size, num_batches
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if self.world_size > 1 and start % self.global_batch:
            raise ValueError(f"start={start} must be a multiple of the global batch {self.global_batch}")
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order[self.start:self.num_batches * self.global_batch]
        if self.world_size > 1:
            order = order.view(-1, self.world_size, self.batch_size)[:, self.rank].reshape(-1)
        return iter(order.tolist())

    def __len__(self) -> int:
        return max(0, self.num_batches * self.global_batch - self.start) // self.world_size


def default_train_threads(cores: int, workers: int) -> int:
    """CPU training: the step's intra-op threads beside ``workers`` loader processes.

    Below 4 cores the step keeps every core, and a worker (``data.num_workers=1``) shares them: its
    augmentation fills the gaps the step leaves (serial Python and launch work) and takes the data off
    the step's path. Measured on 2 cores (small CLIP, 224 px, batch 64, industrial augmentation), five
    paired runs on a busy host: 1 worker + 2 threads 78-102 samples/s against 68-90 for items built in
    the main process, better in 4 of 5 pairs; 1 worker + 1 thread was worst (39 against 56). From 4
    cores the workers get cores of their own (unmeasured here: no such machine)."""
    return max(1, cores if cores < 4 else cores - workers)


def train_threads(cores: int, workers: int) -> int:
    """The CPU step's threads: ``OMP_NUM_THREADS`` when it is set (the variable PyTorch itself reads; a user
    or a test run that pins it keeps it), else :func:`default_train_threads`."""
    pinned = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(pinned) if pinned.isdigit() and int(pinned) > 0 else default_train_threads(cores, workers)


def build_data(cfg: Any, processor: Any):
    """Train / val / test datasets of the run config (``data``, ``domain``, ``model`` sections), their
    images left uint8 so each batch is normalised on the device (1/4 of the bytes to move)."""
    from clipexp.data.dataset import build_datasets
    from clipexp.data.webdataset import build_webdataset_splits  # data=webdataset: shards streamed

    build = build_webdataset_splits if cfg.data.source == "webdataset" else build_datasets
    return build(
        OmegaConf.to_container(cfg.data, resolve=True),
        processor=processor,
        image_resolution=cfg.model.image_resolution,
        max_sequence_length=cfg.model.max_sequence_length,
        prompt_templates=list(cfg.domain.prompt_templates),
        augmentation=OmegaConf.to_container(cfg.domain.augmentation, resolve=True),
        seed=cfg.seed,
        pixels="uint8",
        image_interpolation=cfg.model.image_interpolation,
    )


def build_eval_data(cfg: Any, processor: Any) -> Optional[Tuple[str, Any, List[str], List[str]]]:
    """``eval_data``: an evaluation-only source (e.g. a retention set) -> ``(name, dataset, class names,
    zero-shot prompts)``, or None when unset. ``eval_data.split`` takes that split of it (its own
    ``*_split`` keys, the run's seed) or ``all`` of it; its prompts default to the domain's."""
    if cfg.get("eval_data") is None:
        return None
    from clipexp.data.dataset import build_datasets
    from clipexp.errors import ConfigError

    ev = OmegaConf.to_container(cfg.eval_data, resolve=True)
    name, which = ev.pop("name"), ev.pop("split")
    templates = list(ev.pop("prompt_templates") or cfg.domain.prompt_templates)
    if which == "all":  # every pair: built as a lone train split, with the evaluation transforms
        ev.update(train_split=1.0, val_split=0.0, test_split=0.0, augment_images=False, augment_text=False)
    splits = build_datasets(ev, processor=processor, image_resolution=cfg.model.image_resolution,
                            max_sequence_length=cfg.model.max_sequence_length, prompt_templates=templates, seed=cfg.seed, pixels="uint8",
                            image_interpolation=cfg.model.image_interpolation)
    dataset = splits.train if which == "all" else getattr(splits, which)
    if dataset is None or len(dataset) == 0:
        raise ConfigError(f"eval_data.{which}_split", ev.get(f"{which}_split"),
                          f"a split with pairs ({splits.num_pairs} pairs in all): raise it or use eval_data.split=all")
    log.info("eval_data %r: %d pairs (%s split of %s), evaluated as %s/... with every val evaluation", name, len(dataset), which,
             ev["source"], name)
    return name, dataset, list(splits.class_names), templates


def build_train_loader(dataset, sampler: EpochSampler, num_workers: Optional[int], device_type: str,
                       local_world_size: int = 1) -> DataLoader:
    """The training loader over ``sampler``; on CPU also the step's thread count (see the two defaults).

    Persistent workers: started once, not again every epoch (a fork, or with spawn a fresh interpreter
    and the pickled dataset). Items stay those of (seed, epoch, index) whatever the worker count or
    resume point: ``set_epoch`` writes the epoch to shared memory before each epoch's ``iter()``, and
    only then does the loader hand the workers that epoch's indices.
    """
    from clipexp.data.dataloader import build_loader, default_num_workers

    cores = max(1, (os.cpu_count() or 1) // local_world_size)  # this process's share of the node
    workers = num_workers if num_workers is not None else default_num_workers(cores, device_type)
    if device_type == "cpu":
        torch.set_num_threads(train_threads(cores, workers))
    if getattr(dataset, "is_stream", False):  # data=webdataset: its own loader (steps_per_epoch from the shards)
        from clipexp.data.webdataset import StreamLoader

        return build_loader(dataset, sampler=sampler, num_workers=workers, pin_memory=device_type == "cuda", loader_class=StreamLoader)
    return build_loader(dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=workers, pin_memory=device_type == "cuda")


def stop_workers(loader: Optional[DataLoader]) -> None:
    """Stop a loader's persistent workers now rather than whenever the loader is garbage-collected (a sweep
    runs its jobs one after another in one process). DataLoader has no public call for this."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def text_has_dropout(model) -> bool:
    """The text tower's config dropouts, or a dropout module in it (e.g. LoRA's ``model.lora.dropout``)."""
    text_cfg = model.config.text_config
    if float(getattr(text_cfg, "dropout", 0.0) or 0.0) + float(getattr(text_cfg, "attention_dropout", 0.0) or 0.0) > 0.0:
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.text_model.modules())


class DeviceBatches:
    """A loader batch -> the towers' inputs on the device.

    Pixels travel as uint8 and are normalised there (on CPU into one kept buffer: each step is done with
    its pixels before the next is normalised). Captions are packed on the CPU side (``pack``: padding
    cut to the batch's longest caption, and with ``dedup`` each distinct caption once, ``text_index``
    mapping samples to them; see :func:`clipexp.models.clip.pack_captions`), so nothing here waits for
    the device. ``dedup`` must be off when the text tower has dropout (one mask for all copies otherwise).
    """

    def __init__(self, device: torch.device, image_transform, pack: bool, dedup: bool):
        from clipexp.data.normalize import PixelNormalizer

        self.device, self.pack, self.dedup = device, pack, dedup
        self.normalize_pixels = PixelNormalizer(image_transform.mean, image_transform.std, reuse_cpu_buffer=True)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        dev = self.device
        out = dict(batch)
        out["pixel_values"] = self.normalize_pixels(batch["pixel_values"].to(dev, non_blocking=True))
        ids, mask, index = batch["input_ids"], batch["attention_mask"], None
        if self.pack:
            ids, mask, index = pack_captions(ids, mask, dedup=self.dedup)
        out["input_ids"], out["attention_mask"] = ids.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
        out["text_index"] = None if index is None else index.to(dev, non_blocking=True)
        for key in ("group_ids", "labels"):
            out[key] = batch[key].to(dev, non_blocking=True)
        return out
