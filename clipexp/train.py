"""The training loop: plain PyTorch, readable top to bottom.

``run(cfg)`` is the Hydra task. It builds a :class:`Trainer` (``setup`` -> ``train`` -> ``cleanup``),
which applies the run config on the chosen device:

* AdamW, weight decay off norms, biases, embeddings and temperatures; linear warmup + cosine decay
  (``lr_at``, ten lines); gradient accumulation (plain: micro-batch losses averaged, so each
  micro-batch's negatives come from that micro-batch only); gradient clipping; autocast in the
  device's precision with a GradScaler for fp16; the temperature schedule applied every step.
* Evaluation at step 0 (the pre-fine-tuning baseline), every ``eval_steps`` and on the test split at
  the end (with the best checkpoint's weights when one was kept).
* Checkpoints every ``save_steps``, written atomically, the last ``keep_last`` kept plus the best by
  ``trainer.monitor``; ``trainer.resume=latest|<path>`` restores everything, including the position in
  the epoch, and continues the same MLflow run.
* A non-finite loss stops the run naming the step; Ctrl-C / SIGTERM save a checkpoint and mark the
  run KILLED; any crash closes the MLflow run as FAILED.
* Under ``torchrun`` (see :mod:`clipexp.distributed`): DistributedDataParallel over the two towers;
  ``trainer.batch_size`` is each process's micro-batch and the global batch of a step is
  ``batch_size x processes x accumulation``; each rank trains on its slice of the same seeded
  permutation; the loss sees every rank's embeddings, group ids and labels (``gather_with_grad``), so
  its negatives span the global batch and the gradient is that of the single-process loss on the
  global batch; the learning rate and ``train/samples_per_s`` refer to the global batch. Evaluation
  is sharded by batches and gathered in order (the numbers of a single process). Only rank 0 writes
  checkpoints and outputs, logs to MLflow and prints; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Sampler

from clipexp import distributed, plots
from clipexp.config import ConfigError, validate
from clipexp.device import DeviceError, DeviceManager
from clipexp.distributed import DistContext
from clipexp.gradcache import exact_accumulation_step
from clipexp.memory import (
    BatchTooLargeError,
    BatchSizeCache,
    OOMRecovery,
    estimate_batch_size_for_model,
    is_oom,
    make_train_step_probe,
    resolve_batch_size,
    split_batch,
)
from clipexp.evaluate import class_text_embeddings, evaluate_retrieval, zero_shot_metrics
from clipexp.losses import TemperatureScheduler, build_loss, gather_with_grad
from clipexp.models import ModelLoadError, count_parameters, image_features, load_clip, pack_captions, text_features
from clipexp.tracking import flatten, git_commit, make_tracker, overrides_run_name

log = logging.getLogger(__name__)

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
DEFAULT_BATCH = {"cuda": 32, "mps": 16, "cpu": 8}  # the original notes' defaults when not probing


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf. One line naming the step and the last good checkpoint."""


# --------------------------------------------------------------------------------------------------
# Small pure pieces
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_ratio * base_lr``.

    ``step`` is the optimizer step about to be taken (0-based).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(modules: Dict[str, torch.nn.Module], weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decay for weight matrices; none for norms, biases, embeddings, temperatures."""
    decay, no_decay = [], []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            full = f"{prefix}.{name}"
            if p.ndim < 2 or "embedding" in full or "logit_scale" in full or "norm" in full or full.startswith("loss."):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def default_train_workers(cores: Optional[int] = None, device_type: str = "cuda") -> int:
    """Loader workers when ``data.num_workers`` is null.

    On an accelerator: half the cores (at least 1 from 2 cores, at most 4), so augmentation runs beside
    the device step. On CPU: none below 4 cores (items are built in the main process between steps),
    a quarter of the cores from 4 (at most 4); see :func:`default_train_threads` for the step's threads.
    Measured on 2 cores: the quick start (tiny model, 128 px) takes 51 s with 0 workers and 59 s with one
    persistent worker (same metrics); for the benchmark's small CLIP at 224 px one worker and in-process
    items measured alike (a/b 0.90 both), so ``data.num_workers=1`` is only worth trying for heavier
    augmentation on small CPUs. Inside a launcher's worker process
    (joblib/loky): 0, since nested loader processes are not allowed there.
    ``cores``: the cores this process may use (default: all; under torchrun, its share of the node)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return 0
    cores = cores or os.cpu_count() or 1
    if device_type == "cpu":
        return 0 if cores < 4 else min(4, cores // 4)
    return 0 if cores < 2 else min(4, max(1, cores // 2))


def default_train_threads(cores: int, workers: int) -> int:
    """CPU training: the step's intra-op threads beside ``workers`` loader processes.

    Below 4 cores the step keeps every core, and a worker (``data.num_workers=1``) shares them: its
    augmentation fills the gaps the step leaves (serial Python and launch work) and takes the data off
    the step's path. Measured on 2 cores (small CLIP, 224 px, batch 64, industrial augmentation), five
    paired runs on a busy host: 1 worker + 2 threads 78-102 samples/s against 68-90 for items built in
    the main process, better in 4 of 5 pairs; 1 worker + 1 thread was worst (39 against 56). From 4
    cores the workers get cores of their own (unmeasured here: no such machine)."""
    return max(1, cores if cores < 4 else cores - workers)


class DualEncoder(nn.Module):
    """A CLIP's two towers as one module whose ``forward`` returns both embeddings.

    This is what DistributedDataParallel wraps: DDP synchronises gradients only for a module whose
    forward it runs. It holds the towers and projections (the same modules as the CLIP, not copies) and
    not ``logit_scale``: the temperature is used by the loss alone, which every rank computes on the
    same gathered batch, so its gradient is already the global one on every rank (the trainer averages
    those few loss-only gradients itself). So no parameter of the wrapped module is ever unused and DDP
    needs no ``find_unused_parameters``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection
        self.text_model, self.text_projection = model.text_model, model.text_projection

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                text_index: Optional[torch.Tensor] = None):
        return image_features(self, pixel_values), text_features(self, input_ids, attention_mask, text_index=text_index)


def enable_checkpointing(model: nn.Module, towers: str = "both") -> None:
    """Activation (gradient) checkpointing in the transformer layers of ``towers``: both, image or text.

    Non-reentrant (PyTorch's recommendation: works with a frozen tower's inputs and under DDP). The
    other tower's layers are switched back off, whatever the transformers version keeps the flag on
    (the encoder in 4.x, each layer in 5.x).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (gradient_checkpointing_enable is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    off = {"image": [model.text_model], "text": [model.vision_model]}.get(towers, [])
    for tower in off:
        for module in tower.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False


def _gather(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else gather_with_grad(t)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def find_latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """Newest ``step_*.pt`` in this run's folder, else in sibling runs under the same outputs root."""
    own = sorted((output_dir / "checkpoints").glob("step_*.pt"))
    if own:
        return own[-1]
    root = output_dir.parent.parent  # outputs/<date>/<time> -> outputs
    found = list(root.glob("*/*/checkpoints/step_*.pt")) + list(root.glob("*/*/*/checkpoints/step_*.pt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    """setup -> train -> cleanup for one run config (a composed Hydra config or an equivalent DictConfig)."""

    def __init__(self, cfg: DictConfig, output_dir: Path, overrides: Optional[List[str]] = None,
                 hydra_dir: Optional[Path] = None, tags: Optional[Dict[str, Any]] = None):
        self.cfg = cfg
        self.dist: DistContext = distributed.current()  # setup() starts the process group under torchrun
        self.extra_tags = dict(tags or {})
        self.output_dir = Path(output_dir)
        self.overrides = list(overrides or [])
        self.hydra_dir = hydra_dir
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.tracker = None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evals_without_improvement = 0
        self.history: Dict[str, List[tuple]] = {}
        self.results: Dict[str, Dict[str, float]] = {}
        self.last_checkpoint: Optional[Path] = None
        self.status = "FAILED"

    # ---------------------------------------------------------------------------------------- setup
    def setup(self) -> "Trainer":
        cfg, t = self.cfg, self.cfg.trainer
        validate(cfg)
        _quiet_libraries()
        self.dist = distributed.init_distributed(cfg.device.type, t.dist_timeout_s)  # single process: no-op
        seed_everything(cfg.seed)

        self.devices = DeviceManager(cfg.device.type, cfg.device.precision)
        self.device = self.devices.device
        self.dev = self.devices.info
        self.devices.log_device_info()
        if self.dist.enabled:
            if self.dev.type == "mps":
                raise ConfigError("device.type", cfg.device.type, "cpu or cuda under torchrun (DistributedDataParallel does not run on MPS)")
            log.info("distributed: %s", self.dist.describe())

        # model + processor (weights of a built model follow the seed)
        m = cfg.model
        arch = OmegaConf.to_container(m.architecture) if m.architecture is not None else None
        self.model, self.processor = load_clip(m.name_or_path, arch, m.image_resolution, m.max_sequence_length)
        self._apply_model_levers()
        self.model.to(self.device)

        # data
        from clipexp.data import build_datasets, collate_fn
        from clipexp.data.transforms import PixelNormalizer

        self.data = build_datasets(
            OmegaConf.to_container(cfg.data, resolve=True),
            processor=self.processor,
            image_resolution=m.image_resolution,
            max_sequence_length=m.max_sequence_length,
            prompt_templates=list(cfg.domain.prompt_templates),
            augmentation=OmegaConf.to_container(cfg.domain.augmentation, resolve=True),
            seed=cfg.seed,
            pixels="uint8",  # normalised per batch on the device (_device_batch): 1/4 of the bytes to move
        )
        self.collate = collate_fn
        tf = self.data.train.image_transform
        # each step is done with its pixels before the next is normalised: reuse one CPU buffer
        self.normalize_pixels = PixelNormalizer(tf.mean, tf.std, reuse_cpu_buffer=True)
        text_cfg = self.model.config.text_config
        text_dropout = float(getattr(text_cfg, "dropout", 0.0) or 0.0) + float(getattr(text_cfg, "attention_dropout", 0.0) or 0.0)
        self.dedup_captions = bool(t.pack_captions) and text_dropout == 0.0  # one dropout mask for all copies otherwise

        # loss (needed by the batch-size probe), then the batch: micro-batch x accumulation = logical batch
        loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
        self.loss_fn = build_loss(loss_cfg["name"], **loss_cfg).to(self.device)
        # (under torchrun: per process; rank 0 resolves it, so every rank uses the same; the global batch of
        # a step is logical batch x world size, and every rank takes its slice of the same permutation)
        world = self.dist.world_size
        self.batch_size, how = self.dist.broadcast(self._resolve_batch_size() if self.dist.is_main else None)
        if self.dist.enabled and not self.dist.is_main and t.batch_size is None and self.dev.type == "cuda":
            torch.manual_seed(cfg.seed)  # as rank 0 after its probe: same RNG on every rank
        n_train = len(self.data.train)
        self.batch_size = min(self.batch_size, max(1, n_train // world))
        self.oom = OOMRecovery(self.batch_size, t.gradient_accumulation_steps, device=self.device)
        self.logical_batch = self.oom.logical_batch
        self.global_batch = self.logical_batch * world
        if world == 1:
            log.info("micro-batch %d (%s) x %d accumulation = logical batch %d", self.batch_size, how, t.gradient_accumulation_steps, self.logical_batch)
        else:
            log.info("micro-batch %d (%s) x %d accumulation x %d processes = global batch %d",
                     self.batch_size, how, t.gradient_accumulation_steps, world, self.global_batch)
        self.steps_per_epoch = max(1, n_train // self.global_batch)
        self.total_steps = t.max_steps or t.num_epochs * self.steps_per_epoch
        self.sampler = EpochSampler(n_train, min(self.logical_batch, max(1, n_train // world)), self.steps_per_epoch, cfg.seed,
                                    shuffle=cfg.data.shuffle, rank=self.dist.rank, world_size=world)
        cores = max(1, (os.cpu_count() or 1) // self.dist.local_world_size)  # this process's share of the node
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_train_workers(cores, self.dev.type)
        if self.dev.type == "cpu":
            torch.set_num_threads(default_train_threads(cores, workers))
        # Persistent workers: started once, not again every epoch (a fork, or with spawn a fresh interpreter
        # and the pickled dataset). Items stay those of (seed, epoch, index) whatever the worker count or
        # resume point: set_epoch writes the epoch to shared memory before each epoch's iter(), and only
        # then does the loader hand the workers that epoch's indices.
        self.train_loader = DataLoader(
            self.data.train, batch_size=self.sampler.batch_size, sampler=self.sampler, collate_fn=collate_fn,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=self.dev.type == "cuda", drop_last=False,
        )
        self.eval_batch_size = t.eval_batch_size or max(self.batch_size, 32)

        # temperature schedule, optimizer, scaler
        self.temp_schedule = TemperatureScheduler(
            initial_temp=cfg.loss.temperature, min_temp=cfg.loss.min_temp, max_temp=cfg.loss.max_temp,
            warmup_steps=cfg.loss.temp_warmup_steps, total_steps=self.total_steps,
            schedule_type=cfg.loss.temperature_schedule, decay_rate=cfg.loss.temp_decay_rate,
            patience=cfg.loss.temp_patience, factor=cfg.loss.temp_factor,
        )
        fused = bool(t.fused_adamw and self.dev.type == "cuda")
        self.optimizer = torch.optim.AdamW(
            param_groups({"model": self.model, "loss": self.loss_fn}, t.weight_decay),
            lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused or None,
        )
        self.scaler = torch.amp.GradScaler(self.dev.type, enabled=self.dev.use_grad_scaler)

        # resume (before tracking: the checkpoint names the MLflow run to continue)
        # (every rank loads the checkpoint rank 0 resolved: a shared filesystem, as for the outputs)
        resume_state = None
        if t.resume:
            path = None
            if self.dist.is_main:
                path = find_latest_checkpoint(self.output_dir) if t.resume == "latest" else Path(t.resume)
            path = self.dist.broadcast(path)
            if path is None or (self.dist.is_main and not path.is_file()):
                raise ConfigError("trainer.resume", t.resume, "latest (with a checkpoint under outputs/) or a checkpoint file path")
            if not path.is_file():
                raise ConfigError("trainer.resume", t.resume, f"a checkpoint every rank can read; rank 0 found {path} but rank "
                                  f"{self.dist.rank} cannot: put the outputs on a filesystem every node shares")
            resume_state = self.load_checkpoint(path)

        # the module the training step runs: the two towers, under DDP when there are several processes
        self.encoder = self._wrap_encoder()

        self.tracker = make_tracker(cfg.tracking.enabled and self.dist.is_main, cfg.tracking.uri, cfg.tracking.experiment)
        if resume_state is not None and resume_state.get("run_id") and self.tracker.enabled:
            self.tracker.start(run_id=resume_state["run_id"], system_metrics=cfg.tracking.system_metrics)
            self.tracker.set_tags({"resumed_from": str(self.resumed_from), "resumed_at_step": self.step})
        else:
            self.tracker.start(
                run_name=cfg.tracking.run_name or overrides_run_name(self.overrides),
                tags=self._tags(), parent_run_id=self._parent_run_id(),
                system_metrics=cfg.tracking.system_metrics,
            )
            self.tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
            self.tracker.log_params({
                "derived.batch_size": self.batch_size, "derived.logical_batch": self.logical_batch,
                "derived.world_size": self.dist.world_size, "derived.global_batch": self.global_batch,
                "derived.total_steps": self.total_steps,
                "derived.steps_per_epoch": self.steps_per_epoch, "derived.precision": self.dev.precision,
                "derived.num_parameters": count_parameters(self.model),
                "derived.num_train_pairs": len(self.data.train), "derived.num_val_pairs": _len(self.data.val),
                "derived.num_test_pairs": _len(self.data.test),
            })
        log.info(
            "train %d / val %d / test %d pairs; %d steps (%d per epoch) of %d samples (%s accumulation); outputs in %s",
            len(self.data.train), _len(self.data.val), _len(self.data.test), self.total_steps,
            self.steps_per_epoch, self.global_batch, t.accumulation, self.output_dir,
        )
        return self

    def _wrap_encoder(self) -> nn.Module:
        """The towers as one module; under torchrun wrapped in DistributedDataParallel.

        Not wrapped when nothing in the towers trains (both locked), or with exact accumulation of
        several micro-batches: GradCache runs the towers itself (no-grad pass, then re-forward per
        micro-batch), so that step averages its gradients once, explicitly (``_accumulate``).
        """
        encoder = DualEncoder(self.model)
        t = self.cfg.trainer
        exact = t.accumulation == "exact" and t.gradient_accumulation_steps > 1
        if not self.dist.enabled or exact or not any(p.requires_grad for p in encoder.parameters()):
            return encoder
        from torch.nn.parallel import DistributedDataParallel as DDP

        # CLIP's buffers (position ids) are constants: no buffer broadcast before every forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(encoder, device_ids=device_ids, gradient_as_bucket_view=True, **no_buffer_sync)

    def _resolve_batch_size(self) -> tuple[int, str]:
        """Configured, else (CUDA) cached or probed, else a memory estimate, else the notes' defaults."""
        t, m = self.cfg.trainer, self.cfg.model
        if t.batch_size is not None:
            return int(t.batch_size), "configured"
        key = BatchSizeCache.key(m.name_or_path or f"built:{m.name}", m.image_resolution, self.dev.precision, self.dev.name,
                                 f"ckpt={m.gradient_checkpointing},li={m.lock_image},lt={m.lock_text},loss={self.cfg.loss.name}")
        probe = None
        if self.dev.type == "cuda":
            probe = make_train_step_probe(self.model, self.loss_fn, device=self.device, resolution=m.image_resolution,
                                          seq_len=m.max_sequence_length, autocast=self.dev.autocast)

        def estimate() -> int:
            return estimate_batch_size_for_model(self.model, image_resolution=m.image_resolution, seq_len=m.max_sequence_length,
                                                 precision=self.dev.precision, device=self.device)

        size, how = resolve_batch_size(requested=None, device_type=self.dev.type, probe=probe, cache=BatchSizeCache(),
                                       cache_key=key, estimate=estimate, fallback=DEFAULT_BATCH)
        if self.dev.type == "cuda":
            torch.manual_seed(self.cfg.seed)  # the probe drew random numbers; keep runs reproducible
        log.info("trainer.batch_size=null: micro-batch %d found by %s on %s", size, how, self.dev.type)
        return size, how

    def _apply_model_levers(self) -> None:
        m, d = self.cfg.model, self.cfg.device
        if m.lock_image:
            for mod in (self.model.vision_model, self.model.visual_projection):
                mod.requires_grad_(False)
        if m.lock_text:
            for mod in (self.model.text_model, self.model.text_projection):
                mod.requires_grad_(False)
        if m.gradient_checkpointing:
            enable_checkpointing(self.model, "both" if m.gradient_checkpointing is True else m.gradient_checkpointing)
        if d.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if d.compile:
            self.model.vision_model.compile()
            self.model.text_model.compile()

    def _tags(self) -> Dict[str, str]:
        c = self.cfg
        return {
            "domain": c.domain.name, "loss": c.loss.name, "model": c.model.name, "data": c.data.source,
            "git_commit": git_commit(), "hydra_overrides": " ".join(self.overrides) or "(none)",
            "output_dir": str(self.output_dir), "device": f"{self.dev.type}:{self.dev.name}", "precision": self.dev.precision,
            **self.extra_tags,
        }

    def _parent_run_id(self) -> Optional[str]:
        """A sweep's parent run id, written by the sweep callback into the sweep folder."""
        marker = self.output_dir.parent / "mlflow_parent_run_id"
        return marker.read_text().strip() if marker.is_file() else None

    # ---------------------------------------------------------------------------------------- train
    def _logical_batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        """One logical batch per optimizer step, forever, epoch after epoch, tracking the position for exact resume."""
        while True:
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
            self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.sampler.global_batch)
            self.data.train.set_epoch(self.epoch)
            for batch in self.train_loader:
                self.batch_in_epoch += 1
                yield batch

    def _global_loss(self, img: torch.Tensor, txt: torch.Tensor, group_ids: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None, logit_scale: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The loss over every rank's samples: embeddings (with their gradient), group ids and labels are
        gathered in rank order first, so negatives and positives span the global batch. One process: the loss."""
        return self.loss_fn(gather_with_grad(img), gather_with_grad(txt), group_ids=_gather(group_ids), labels=_gather(labels),
                            logit_scale=logit_scale)

    def _device_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """A loader batch -> the towers' inputs on the device.

        Pixels travel as uint8 and are normalised there. Captions are packed on the CPU side
        (``trainer.pack_captions``: padding cut to the batch's longest caption, each distinct caption
        once, ``text_index`` mapping samples to them; see :func:`clipexp.models.clip.pack_captions`),
        so nothing here waits for the device.
        """
        dev = self.device
        out = dict(batch)
        out["pixel_values"] = self.normalize_pixels(batch["pixel_values"].to(dev, non_blocking=True))
        ids, mask, index = batch["input_ids"], batch["attention_mask"], None
        if self.cfg.trainer.pack_captions:
            ids, mask, index = pack_captions(ids, mask, dedup=self.dedup_captions)
        out["input_ids"], out["attention_mask"] = ids.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
        out["text_index"] = None if index is None else index.to(dev, non_blocking=True)
        for key in ("group_ids", "labels"):
            out[key] = batch[key].to(dev, non_blocking=True)
        return out

    def _forward_loss(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        b = self._device_batch(batch)
        with self.dev.autocast():
            img, txt = self.encoder(b["pixel_values"], b["input_ids"], b["attention_mask"], b["text_index"])
        return self._global_loss(img, txt, b["group_ids"], b["labels"], logit_scale=self.model.logit_scale)

    def _accumulate(self, micro_batches: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Forward + backward of one logical batch; gradients land in ``.grad``. Returns the loss output.

        Several processes: on return ``.grad`` holds the gradient of the global batch's loss on every
        rank (DDP averages the towers' gradients in the last micro-batch's backward; the loss-only
        parameters, and every parameter in an exact-accumulation step, are averaged here).
        """
        if self.cfg.trainer.accumulation == "exact" and len(micro_batches) > 1:
            out = exact_accumulation_step(self.model, self._global_loss, micro_batches, device=self.device, autocast=self.dev.autocast,
                                          loss_scale=self.scaler, logit_scale=self.model.logit_scale, prepare=self._device_batch)
            self._check_finite(out["loss"])
            self.dist.average_gradients(self._trainable_parameters())
            return out
        total = sum(b["pixel_values"].shape[0] for b in micro_batches)
        loss_sum = None
        for i, batch in enumerate(micro_batches):
            with self._gradient_sync(last=i == len(micro_batches) - 1):
                out = self._forward_loss(batch)
                weight = batch["pixel_values"].shape[0] / total  # plain: micro-batch losses averaged by size
                self.scaler.scale(out["loss"] * weight).backward()
            part = out["loss"].detach() * weight
            loss_sum = part if loss_sum is None else loss_sum + part
        # one check (one wait for the device) per step: a NaN in any micro-batch makes the sum NaN, and
        # raising here, before the optimizer step, keeps the weights of the last good step
        self._check_finite(loss_sum)
        self.dist.average_gradients(self._loss_only_parameters())
        out = dict(out)
        out["loss"] = loss_sum
        return out

    def _gradient_sync(self, last: bool):
        """DDP all-reduces gradients in the backward of the last micro-batch only (``no_sync`` before)."""
        return contextlib.nullcontext() if last or not hasattr(self.encoder, "no_sync") else self.encoder.no_sync()

    def _trainable_parameters(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _loss_only_parameters(self) -> List[torch.Tensor]:
        """Parameters only the loss uses (the model's and the loss's temperatures, SigLIP's bias): outside DDP."""
        return [p for p in (self.model.logit_scale, *self.loss_fn.parameters()) if p.requires_grad]

    def _run_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One logical batch with OOM recovery (one process). Under torchrun a rank cannot shrink its
        micro-batch alone (the others would wait in a collective of another shape), so an OOM stops
        the run with what to change."""
        if not self.dist.enabled:
            return self.oom.run(self._accumulate, batch, cleanup=self._on_oom_cleanup)
        try:
            return self._accumulate(split_batch(batch, self.oom.micro))
        except Exception as err:
            if is_oom(err):
                raise ConfigError("trainer.batch_size", self.batch_size,
                                  f"too large: rank {self.dist.rank} ran out of memory at step {self.step + 1} (under torchrun the "
                                  f"micro-batch is not halved automatically); lower it and raise trainer.gradient_accumulation_steps") from None
            raise

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {self.step + 1}{where}; lower trainer.learning_rate, "
                f"raise loss.temperature or use device.precision=fp32"
            )

    def _on_oom_cleanup(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("out of memory at step %d with micro-batch %d; retrying the same logical batch with micro-batch %d",
                    self.step + 1, self.oom.micro, max(1, (self.oom.micro + 1) // 2))

    def train(self) -> Dict[str, Dict[str, float]]:
        cfg, t = self.cfg, self.cfg.trainer
        if self.step == 0 and t.eval_at_start:
            self.evaluate("val")
        batches = self._logical_batches()
        window_loss, window_samples, window_start = [], 0, time.perf_counter()
        progress = _progress(self.total_steps, self.step, enabled=t.progress and self.dist.is_main)
        stop = self.step >= self.total_steps
        try:
            while not stop:
                self.model.train()
                lr = lr_at(self.step, t.learning_rate, t.warmup_steps, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if cfg.loss.temperature_schedule != "constant":
                    self.loss_fn.temperature = self.temp_schedule.step(self.step, loss=window_loss[-1] if window_loss else None)

                batch = next(batches)
                micro_before = self.oom.micro
                out = self._run_step(batch)
                if self.oom.micro != micro_before:
                    self.tracker.set_tags({"oom_recovery": f"step {self.step + 1}: micro-batch {micro_before} -> {self.oom.micro}"})
                step_loss = float(out["loss"])
                window_samples += batch["pixel_values"].shape[0] * self.dist.world_size  # the global batch

                self.scaler.unscale_(self.optimizer)
                params = self._trainable_parameters()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                window_loss.append(step_loss)
                progress.update(1)

                if self.step % t.logging_steps == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics = {
                        "train/loss": sum(window_loss) / len(window_loss), "train/lr": lr,
                        "train/temperature": float(out["temperature"]), "train/grad_norm": float(grad_norm),
                        "train/samples_per_s": window_samples / max(elapsed, 1e-9), "train/epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                    }
                    self._log(metrics)
                    progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", samples_s=f"{metrics['train/samples_per_s']:.0f}")
                    window_loss, window_samples, window_start = [], 0, time.perf_counter()

                if self.step % t.eval_steps == 0 or self.step == self.total_steps:
                    improved = self.evaluate("val")
                    if t.early_stopping_patience and not improved and self.evals_without_improvement >= t.early_stopping_patience:
                        log.info("early stopping at step %d: %s has not improved for %d evaluations", self.step, t.monitor, self.evals_without_improvement)
                        stop = True
                if self.step % t.save_steps == 0 or self.step == self.total_steps or stop:
                    self.save_checkpoint()
                stop = stop or self.step >= self.total_steps
        except KeyboardInterrupt:
            progress.close()
            path = self.save_checkpoint(wait=False)
            self.status = "KILLED"
            log.warning("interrupted at step %d; checkpoint saved to %s (resume with trainer.resume=%s)", self.step, path, path)
            raise
        progress.close()
        self.finish()
        self.status = "FINISHED"
        return self.results

    # ------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def embed(self, dataset) -> Optional[Dict[str, torch.Tensor]]:
        """Embeddings of every pair in ``dataset`` plus its groups and labels, and the mean loss.

        Several processes: the batches are dealt round-robin to the ranks (batch ``i`` to rank
        ``i % world_size``) and rank 0 gathers them back in order, so every batch, its loss and the
        result are those of one process; the other ranks return None.
        """
        self.model.eval()
        n, size = len(dataset), self.eval_batch_size
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        mine = list(range(self.dist.rank, len(batches), self.dist.world_size))
        loader = DataLoader(dataset, batch_sampler=[batches[i] for i in mine], collate_fn=self.collate, num_workers=0)
        parts = []
        for index, batch in zip(mine, loader):
            b = self._device_batch(batch)
            with self.dev.autocast():
                img = image_features(self.model, b["pixel_values"])
                txt = text_features(self.model, b["input_ids"], b["attention_mask"], text_index=b["text_index"])
            out = self.loss_fn(img, txt, group_ids=b["group_ids"], labels=b["labels"], logit_scale=self.model.logit_scale)
            parts.append((index, img.float().cpu(), txt.float().cpu(), batch["group_ids"], batch["labels"], float(out["loss"]), img.shape[0]))
        gathered = self.dist.gather(parts)
        if gathered is None:
            return None
        parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
        _, imgs, txts, groups, labels, losses, weights = zip(*parts)
        return {
            "image": torch.cat(imgs), "text": torch.cat(txts), "groups": torch.cat(groups), "labels": torch.cat(labels),
            "loss": float(np.average(losses, weights=weights)),
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.cfg.model.max_sequence_length, return_tensors="pt")
        with self.dev.autocast():
            return text_features(self.model, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).float().cpu()

    def compute_metrics(self, split: str) -> Dict[str, Any]:
        """Metrics of a split. Several processes: every rank embeds its share, rank 0 computes the
        metrics and sends them to the others (``embeddings`` is None there), so all ranks decide alike."""
        dataset = getattr(self.data, split)
        e = self.embed(dataset)
        result = None
        if e is not None:
            metrics: Dict[str, Any] = {"loss": e["loss"], **evaluate_retrieval(e["image"], e["text"], e["groups"])}
            confusion = None
            if self.data.class_names and (e["labels"] >= 0).any():
                class_embeds = class_text_embeddings(self.encode_prompts, list(self.data.class_names), list(self.cfg.domain.prompt_templates))
                zs = zero_shot_metrics(e["image"], e["labels"], class_embeds)
                confusion = zs.pop("confusion")
                metrics.update(zs)
            result = {"metrics": {f"{split}/{k}": v for k, v in metrics.items()}, "confusion": confusion}
        return {**self.dist.broadcast(result), "embeddings": e}

    def evaluate(self, split: str = "val") -> bool:
        """Evaluate, log, track the best checkpoint. Returns whether the monitored metric improved."""
        t = self.cfg.trainer
        if getattr(self.data, split) is None:
            log.warning("no %s split (data.%s_split=0): skipping evaluation", split, split)
            return False
        result = self.compute_metrics(split)
        metrics = result["metrics"]
        self._log(metrics)
        label = "baseline" if self.step == 0 else f"step {self.step}"
        log.info("%s %s: %s", split, label, "  ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in metrics.items() if "mean_rank" not in k))
        if self.step == 0:
            self.results["baseline"] = dict(metrics)
        self.results["final"] = dict(metrics)
        if t.monitor not in metrics:
            raise ConfigError("trainer.monitor", t.monitor, "one of " + ", ".join(sorted(metrics)))
        value = metrics[t.monitor]
        better = self.best_value is None or (value > self.best_value if t.monitor_mode == "max" else value < self.best_value)
        if better:
            self.best_value, self.best_step = value, self.step
            self.evals_without_improvement = 0
            self.results["best"] = dict(metrics)
            if self.dist.is_main:  # the other ranks read it only in finish(), after rank 0 says it exists
                atomic_save({"model": self.model.state_dict(), "loss_fn": self.loss_fn.state_dict(), "step": self.step,
                             "monitor": t.monitor, "value": value}, self.ckpt_dir / "best.pt")
            self._log({f"best/{t.monitor}": value})
        else:
            self.evals_without_improvement += 1
        return better

    # ---------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, wait: bool = True) -> Path:
        """Rank 0 writes the checkpoint; with ``wait`` every rank waits for it (a barrier). The
        interrupt path passes ``wait=False``: the ranks may be stopped at different points."""
        path = self.ckpt_dir / f"step_{self.step:07d}.pt"
        if self.dist.is_main:
            self._write_checkpoint(path)
        if wait:
            self.dist.barrier()
        if wait or self.dist.is_main:
            self.last_checkpoint = path
        return path

    def _write_checkpoint(self, path: Path) -> None:
        state = {
            "model": self.model.state_dict(), "loss_fn": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "temp_schedule": self.temp_schedule.state_dict(), "loss_temperature": float(self.loss_fn.temperature),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "oom": self.oom.state_dict(),
            "best_value": self.best_value, "best_step": self.best_step, "evals_without_improvement": self.evals_without_improvement,
            "history": self.history, "results": self.results, "rng": rng_state(),
            "run_id": getattr(self.tracker, "run_id", None), "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        atomic_save(state, path)
        for old in sorted(self.ckpt_dir.glob("step_*.pt"))[: -self.cfg.trainer.keep_last]:
            old.unlink(missing_ok=True)

    def load_checkpoint(self, path: Path) -> Dict[str, Any]:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss_fn"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.temp_schedule.load_state_dict(state["temp_schedule"])
        if self.cfg.loss.temperature_schedule != "constant":
            self.loss_fn.temperature = state["loss_temperature"]
        for key in ("step", "epoch", "batch_in_epoch", "best_value", "best_step", "evals_without_improvement", "history", "results"):
            setattr(self, key, state[key])
        set_rng_state(state["rng"])
        self.oom.load_state_dict(state["oom"])
        best = path.parent / "best.pt"
        if self.dist.is_main and best.is_file() and best.parent != self.ckpt_dir:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.ckpt_dir / "best.pt").write_bytes(best.read_bytes())
        self.resumed_from = path
        self.last_checkpoint = path
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
        return state

    # ------------------------------------------------------------------------------------ finishing
    def finish(self) -> None:
        """Test evaluation with the best weights, plots, the model, the metrics JSON; all logged.

        Several processes: every rank loads the best weights and takes part in the test evaluation;
        only rank 0 writes the outputs.
        """
        best = self.ckpt_dir / "best.pt"
        if self.dist.broadcast(best.is_file()):  # (rank 0 wrote it; the broadcast also waits for that)
            state = torch.load(best, map_location=self.device, weights_only=False)
            self.model.load_state_dict(state["model"])
            self.loss_fn.load_state_dict(state["loss_fn"])
            log.info("test evaluation uses the best checkpoint (%s=%.4f at step %d)", state["monitor"], state["value"], state["step"])
        plot_dir = self.output_dir / "plots"
        split = "test" if self.data.test is not None else "val" if self.data.val is not None else None
        result = self.compute_metrics(split) if split is not None else None
        if result is not None and split == "test":
            self._log(result["metrics"])
            self.results["test"] = dict(result["metrics"])
        if not self.dist.is_main:
            return
        plot_dir.mkdir(parents=True, exist_ok=True)
        if result is not None:
            e = result["embeddings"]
            n = min(16, e["image"].shape[0])
            plots.similarity_heatmap(e["image"][:n] @ e["text"][:n].T, _captions(getattr(self.data, split), n),
                                     plot_dir / "similarity_heatmap.png", title=f"{split} pairs: image x text cosine similarity")
            if result["confusion"] is not None:
                plots.confusion_matrix(result["confusion"], list(self.data.class_names), plot_dir / "zeroshot_confusion.png",
                                       title=f"zero-shot confusion ({split})")
        plots.training_curves(self.history, plot_dir / "training_curves.png")

        metrics_path = self.output_dir / "metrics.json"
        metrics_path.write_text(json.dumps({**self.results, "monitor": self.cfg.trainer.monitor, "best_value": self.best_value,
                                            "best_step": self.best_step, "steps": self.step}, indent=2))
        config_path = self.output_dir / "config.yaml"
        OmegaConf.save(self.cfg, config_path, resolve=True)

        model_dir = self.output_dir / "model"
        self.model.save_pretrained(model_dir)
        self.processor.save_pretrained(model_dir)
        from clipexp.serving import publish_model  # clipexp_inference.json, test_split.csv, the pyfunc model (tracking.pyfunc_model)

        publish_model(self.tracker, model_dir, self.cfg, class_names=self.data.class_names, loss_fn=self.loss_fn, model=self.model,
                      step=self.step, best_value=self.best_value, eval_batch_size=self.eval_batch_size,
                      test_pairs=getattr(self.data.test, "pairs", None))

        tr = self.tracker
        tr.log_artifact(config_path)
        tr.log_artifact(metrics_path)
        if self.hydra_dir is not None and self.hydra_dir.is_dir():
            tr.log_artifacts(self.hydra_dir, "hydra")
        tr.log_artifacts(plot_dir, "plots")
        if self.cfg.tracking.log_model:
            tr.log_artifacts(model_dir, "model")

    def _log(self, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((self.step, float(v)))
        self.tracker.log_metrics(metrics, step=self.step)

    def cleanup(self, status: Optional[str] = None) -> None:
        _stop_workers(getattr(self, "train_loader", None))
        if self.tracker is not None:
            self.tracker.end(status or self.status)


def _stop_workers(loader: Optional[DataLoader]) -> None:
    """Stop a loader's persistent workers now rather than whenever the loader is garbage-collected (a sweep
    runs its jobs one after another in one process). DataLoader has no public call for this."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def _len(dataset) -> int:
    return 0 if dataset is None else len(dataset)


def _quiet_libraries() -> None:
    """Our progress bar and log lines are the ones users read; silence transformers' own bars."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _captions(dataset, n: int) -> List[str]:
    caps = list(dataset.captions[:n])
    return [c if isinstance(c, str) else c[0] for c in caps]


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def summary_table(results: Dict[str, Dict[str, float]], best_step: Optional[int] = None) -> str:
    """Baseline, final and best validation metrics and the test metrics, for the metrics users read first."""
    cols = [("baseline", "baseline", "val"), ("final", "final", "val"), ("best", "best", "val"), ("test", "test", "test")]
    rows = ["loss", "i2t_R1", "i2t_R5", "t2i_R1", "t2i_R5", "zeroshot_acc", "zeroshot_balanced_acc"]
    lines = [f"{'metric':<24}" + "".join(f"{title:>10}" for title, _, _ in cols)]
    for r in rows:
        vals = [results.get(key, {}).get(f"{split}/{r}") for _, key, split in cols]
        if all(v is None for v in vals):
            continue
        lines.append(f"{r:<24}" + "".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in vals))
    at = f" (step {best_step})" if best_step is not None else ""
    lines.append(f"baseline = validation at step 0, final = at the last step, best = at the best step{at}; "
                 f"test = test split with the best checkpoint")
    return "\n".join(lines)


def train(cfg: DictConfig, output_dir: Optional[Path] = None, overrides: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    """Train one run config outside Hydra's CLI (tests, notebooks); returns the results dict."""
    trainer = Trainer(cfg, Path(output_dir or "outputs/api"), overrides)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


# --------------------------------------------------------------------------------------------------
# The Hydra task
# --------------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> Optional[float]:
    """Train one job; return the best value of ``trainer.monitor`` (what an Optuna sweep optimises).

    A single run ends a user error with one line and exit code 2 (1 for a non-finite loss). In a sweep a
    failing job is recorded (its MLflow run FAILED, the error in its log) and returns NaN, so the other
    jobs go on and the sweep summary lists it. Under torchrun any failure ends the process (see
    :func:`_stop_rank`): the ranks cannot be trusted to agree on the next collective.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from clipexp.data import DataValidationError

    if distributed.env_world_size() > 1 and int(os.environ.get("RANK", "0")) > 0:
        _quiet_this_rank()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    output_dir = Path(hc.runtime.output_dir)
    hydra_dir = output_dir / hc.output_subdir if hc.output_subdir else None
    tags = {"job_num": hc.job.num, "sweep_dir": str(Path(hc.sweep.dir).resolve())} if multirun else {}
    trainer = Trainer(cfg, output_dir, list(hc.overrides.task), hydra_dir, tags=tags)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    user_errors = (ConfigError, DeviceError, ModelLoadError, DataValidationError, NonFiniteLossError, BatchTooLargeError)
    try:
        trainer.setup()
        results = trainer.train()
    except KeyboardInterrupt:
        if trainer.dist.enabled:
            _stop_rank(trainer, None, user_errors)
        trainer.cleanup("KILLED")
        print(f"clipexp: interrupted at step {trainer.step}; checkpoint: {trainer.last_checkpoint}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        if trainer.dist.enabled:
            _stop_rank(trainer, err, user_errors)
        trainer.cleanup("FAILED")
        expected = isinstance(err, user_errors)
        if multirun:
            log.error("job %s failed: %s", hc.job.num, err, exc_info=not expected)
            print(f"clipexp: job {hc.job.num} failed: {err}", file=sys.stderr)
            return float("nan")
        if expected:
            print(f"clipexp: error: {err}", file=sys.stderr)
            sys.exit(EXIT_FAILED if isinstance(err, NonFiniteLossError) else EXIT_USAGE)
        raise
    except BaseException:
        trainer.cleanup("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    trainer.cleanup("FINISHED")
    if trainer.dist.is_main:
        print(summary_table(results, trainer.best_step))
        print(f"outputs: {output_dir}\nmodel:   {output_dir / 'model'}\nmetrics: {output_dir / 'metrics.json'}\nmlflow:  {trainer.tracker.run_url}")
    return trainer.best_value


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def _quiet_this_rank() -> None:
    """Ranks > 0 log errors only, to stderr, and leave warnings to rank 0 (torchrun ranks get their
    logging from ``__main__``'s Hydra overrides; the tasks of a submitit job get it here)."""
    import warnings

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def _stop_rank(trainer: "Trainer", err: Optional[BaseException], user_errors: tuple) -> None:
    """End this rank of a torchrun job after an error (``err``) or an interrupt (``err=None``); never returns.

    The job ends with one line that says which rank failed and why, whatever rank prints it:

    * A rank whose own code failed leaves ``rank N failed: ...`` in the rendezvous store, then exits
      (a user error: the one line, exit code 2 or 1, as in one process; a bug: its traceback too).
    * torchrun then stops the other ranks (SIGTERM, seen here as an interrupt), or their next collective
      fails first (the peer is gone, or ``trainer.dist_timeout_s`` ran out). They read the store: rank 0
      prints the failed rank's message; with no message (a rank was killed or hangs) it says so.
    * Ctrl-C (torchrun forwards SIGINT) with no failure anywhere: as in one process, rank 0 saves a
      checkpoint, marks the run KILLED, prints where it is and exits 130.

    Rank 0 closes the MLflow run: FAILED, or KILLED for an interrupt. An error that every rank hit
    alike (a bad value, a non-finite loss) is printed once, by rank 0.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut this cleanup short
        signal.signal(sig, signal.SIG_IGN)
    ctx, step = trainer.dist, trainer.step + 1
    own_failure = err is not None and not distributed.is_collective_error(err)
    if own_failure:
        expected = isinstance(err, user_errors)
        what = str(err) if expected else f"{type(err).__name__}: {_first_line(err)}"
        ctx.report("failed", f"rank {ctx.rank} failed at step {step}: {what}")
        status, show = "FAILED", ctx.is_main or not expected
        code = EXIT_FAILED if isinstance(err, NonFiniteLossError) or not expected else EXIT_USAGE
        line = f"clipexp: error: {err}" if expected else f"clipexp: error: rank {ctx.rank}: {what}"
        if not expected:
            traceback.print_exception(err)
    elif (cause := ctx.reported_elsewhere("failed")) is not None:
        status, code, show, line = "FAILED", EXIT_FAILED, ctx.is_main, f"clipexp: error: {cause}"
    elif err is None or ctx.reported_elsewhere("interrupted") is not None:
        if err is None:
            ctx.report("interrupted", f"rank {ctx.rank} interrupted")
        elif ctx.is_main and getattr(trainer, "optimizer", None) is not None:
            with contextlib.suppress(Exception):  # another rank was interrupted first: save here too
                trainer.save_checkpoint(wait=False)
        status, code, show = "KILLED", EXIT_INTERRUPTED, ctx.is_main
        line = f"clipexp: interrupted at step {trainer.step}; checkpoint: {trainer.last_checkpoint}"
    else:
        reason = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(err))  # gloo prefixes its source location
        status, code, show = "FAILED", EXIT_FAILED, True
        line = (f"clipexp: error: rank {ctx.rank} lost the other ranks at step {step} ({reason}); another rank was "
                f"killed or hung: see its log (a collective fails after trainer.dist_timeout_s={ctx.timeout_s:g}s)")
    try:
        trainer.cleanup(status)
    except Exception as cleanup_err:  # noqa: BLE001 - the line below matters more than the run's status
        log.error("could not close the MLflow run as %s: %s", status, cleanup_err)
    if show:
        print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    if err is not None and not own_failure:  # a process group broken mid-collective can abort in interpreter teardown
        os._exit(code)
    sys.exit(code)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
