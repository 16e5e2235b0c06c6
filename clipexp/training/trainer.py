"""The training recipe, read top to bottom: ``setup`` -> ``train`` (which calls ``step``) -> ``finish`` -> ``cleanup``.

* :meth:`Trainer.setup` builds one thing per concern, each in the module that owns it: the device, the model (LoRA,
  locked towers, checkpointing), the data, the loss (``conf/loss/*.yaml`` instantiated), the batch size
  (:mod:`~clipexp.training.memory`), the run's length (:class:`~clipexp.training.optim.StepPlan`), the optimizer,
  the temperature schedule, the weight EMA, the evaluator, a checkpoint to resume, and the MLflow run.
* :meth:`Trainer.step` is one optimizer step on one logical batch: micro-batches (plain or exact accumulation),
  the finite check, unscale, clip, step, EMA; out of memory, the same batch again in smaller micro-batches.
* :meth:`Trainer.train` is the loop: learning rate and temperature, ``step``, logging, evaluation (step 0 = the
  baseline), checkpoints; Ctrl-C or SIGTERM finishes the step in hand, saves it and stops (a second one stops at once).
* :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict` decide what a checkpoint holds.
* :meth:`Trainer.finish` tests the best weights and hands plain data to :mod:`~clipexp.training.finishing`.

The Hydra task around it (exit codes, sweeps, failing ranks) is :func:`clipexp.training.task.run`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from clipexp.config.validate import validate
from clipexp.device import build_device
from clipexp.errors import ConfigError, NonFiniteLossError
from clipexp.evaluate import Evaluator
from clipexp.finetune.ema import ModelEMA
from clipexp.finetune.lora import load_saved_weights, merge_lora, saved_weights
from clipexp.finetune.wise_ft import wise_ft
from clipexp.losses.distributed import gather_with_grad
from clipexp.models.levers import DualEncoder, load_training_model, prepare_for_training, quiet_transformers
from clipexp.tracking.outputs import run_tags, start_tracking, wise_ft_metrics
from clipexp.training import checkpoint, distributed, memory
from clipexp.training.data import (DeviceBatches, EpochSampler, build_data, build_eval_data, build_train_loader, stop_workers,
                                   text_has_dropout)
from clipexp.training.distributed import DistContext
from clipexp.training.finishing import RunOutputs, write_run_outputs
from clipexp.training.gradcache import exact_accumulation_step
from clipexp.training.optim import StepPlan, build_optimizer, lr_at, plan_steps, set_lr, trainable_parameters
from clipexp.training.run_heads import RunHeads

log = logging.getLogger(__name__)

EMA_PREFIX = "ema/"


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
        # the loop's position and bookkeeping: what state_dict() saves beside the weights
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evals_without_improvement = 0
        self.history: Dict[str, List[tuple]] = {}
        self.results: Dict[str, Dict[str, float]] = {}
        self.last_checkpoint: Optional[Path] = None
        self.resumed_from: Optional[Path] = None
        self.status = "FAILED"
        self._stop_requested = False

    # ---------------------------------------------------------------------------------------- setup
    def setup(self) -> "Trainer":
        cfg, t = self.cfg, self.cfg.trainer
        validate(cfg)  # the one check of the config, before anything loads
        quiet_transformers()
        self.dist = distributed.init_distributed(cfg.device.type, t.dist_timeout_s)  # single process: no-op
        checkpoint.seed_everything(cfg.seed)
        devices = build_device(cfg.device, distributed=self.dist.enabled)
        self.device, self.device_info = devices.device, devices.info  # the torch.device; its type, name, precision, autocast
        if self.dist.enabled:
            log.info("distributed: %s", self.dist.describe())

        model, self.processor = load_training_model(cfg.model)
        # WiSE-FT interpolates from the weights the run starts from (a CPU copy: one model's worth of host memory)
        self.start_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if t.wise_ft.alphas else None
        self.model = prepare_for_training(model, cfg.model, cfg.device).to(self.device)  # LoRA, locked towers, checkpointing
        self.data = build_data(cfg, self.processor)  # (a built model's weights follow the seed)
        self.extra_eval = build_eval_data(cfg, self.processor)  # (name, dataset, classes, prompts) or None
        self.dedup_captions = bool(t.pack_captions) and not text_has_dropout(self.model)  # one dropout mask for all copies otherwise
        self.to_device = DeviceBatches(self.device, self.data.train.image_transform, t.pack_captions, self.dedup_captions)
        self.loss_fn = instantiate(cfg.loss, _convert_="all").to(self.device)  # conf/loss/<name>.yaml (before the batch-size probe)
        self._setup_batches()
        self.temperature_schedule = instantiate(cfg.temperature_schedule, initial_temp=self.loss_fn.temperature,
                                                total_steps=self.plan.total_steps)
        self.optimizer, self.scaler = build_optimizer(t, self.model, self.loss_fn, self.device_info.type, self.device_info.use_grad_scaler)
        self.ema = ModelEMA(self.model, float(t.ema.decay)) if t.ema.decay else None  # updated after every optimizer step
        if self.ema is not None:
            log.info("EMA of %d weight tensors, decay %g", len(self.ema.names), self.ema.decay)
        self.evaluator = Evaluator(
            self.model, self.loss_fn, self.processor, prepare=self.to_device, collate=self.collate, autocast=self.device_info.autocast,
            dist=self.dist, device=self.device, batch_size=self.eval_batch_size, max_length=cfg.model.max_sequence_length,
            class_names=self.data.class_names, templates=cfg.domain.prompt_templates)
        self.heads = RunHeads(cfg.eval, self.data, self.evaluator, cfg.seed)  # clipexp.heads on the embeddings (eval group)

        found = checkpoint.resume_checkpoint(cfg, self.output_dir, self.dist, self.device) if t.resume else None  # before tracking: it names the run
        if found:
            self.load_checkpoint(*found)
        # the module the step runs: the two towers, under DDP with several processes, except for exact accumulation
        # of several micro-batches (GradCache runs the towers itself and averages once, in step())
        exact = t.accumulation == "exact" and t.gradient_accumulation_steps > 1
        self.encoder = DualEncoder(self.model) if exact else self.dist.wrap(DualEncoder(self.model), self.device)
        facts = self.facts()
        tags = run_tags(cfg, self.overrides, self.output_dir, device=f"{self.device_info.type}:{self.device_info.name}",
                        precision=self.device_info.precision, loss=self.loss_fn.name, extra=self.extra_tags)
        resume = None if not found else {"run_id": found[1].get("run_id"), "from": self.resumed_from, "step": self.global_step,
                                         "changes": checkpoint.describe_changes(found[2])}
        self.tracker = start_tracking(cfg, enabled=cfg.tracking.enabled and self.dist.is_main, overrides=self.overrides,
                                      output_dir=self.output_dir, tags=tags, derived=facts, data=self.data, resume=resume)
        log.info("train %d / val %d / test %d pairs; %d steps (%d per epoch, %.3g epochs) of %d samples (%s accumulation); "
                 "outputs in %s", facts["num_train_pairs"], facts["num_val_pairs"], facts["num_test_pairs"], self.plan.total_steps,
                 self.plan.steps_per_epoch, self.plan.epochs, self.global_batch, t.accumulation, self.output_dir)
        return self

    def _setup_batches(self) -> None:
        """Micro-batch (rank 0 resolves it, every rank uses it) x accumulation = logical batch; x world size
        = global batch; the run's length; the sampler (every rank its slice of one permutation) and loader."""
        cfg, t, world = self.cfg, self.cfg.trainer, self.dist.world_size
        found = memory.train_batch_size(cfg, self.model, self.loss_fn, self.device_info, self.device) if self.dist.is_main else None
        size, how = self.dist.broadcast(found)
        if self.dist.enabled and not self.dist.is_main and t.batch_size is None and self.device_info.type == "cuda":
            torch.manual_seed(cfg.seed)  # as rank 0 after its probe: same RNG on every rank
        n_train = len(self.data.train)
        if size > max(1, n_train // world):
            log.warning("trainer.batch_size=%d is more than the %d training pairs%s: the micro-batch is %d", size, n_train,
                        f" per process ({world} processes)" if world > 1 else "", max(1, n_train // world))
            size = max(1, n_train // world)
        self.micro = memory.MicroBatches(size, t.gradient_accumulation_steps)
        self.logical_batch = self.micro.logical_batch
        self.global_batch = self.logical_batch * world
        if world == 1:
            log.info("micro-batch %d (%s) x %d accumulation = logical batch %d", size, how, t.gradient_accumulation_steps, self.logical_batch)
        else:
            log.info("micro-batch %d (%s) x %d accumulation x %d processes = global batch %d",
                     size, how, t.gradient_accumulation_steps, world, self.global_batch)
        self.sampler = EpochSampler(n_train, min(self.logical_batch, max(1, n_train // world)), max(1, n_train // self.global_batch),
                                    cfg.seed, shuffle=cfg.data.shuffle, rank=self.dist.rank, world_size=world)
        self.train_loader = build_train_loader(self.data.train, self.sampler, cfg.data.num_workers, self.device_info.type,
                                               self.dist.local_world_size)
        self.collate = self.train_loader.collate_fn
        steps_per_epoch = getattr(self.train_loader, "steps_per_epoch", self.sampler.num_batches)  # a stream: what its shards hold
        self.plan: StepPlan = plan_steps(t, steps_per_epoch)  # warm-up, evaluation and checkpoint intervals that fit the run
        self.eval_batch_size = t.eval_batch_size or max(size, 32)

    def facts(self) -> Dict[str, Any]:
        """What setup worked out from the config and the data, as plain values (logged as ``derived.<name>``)."""
        def count(dataset) -> int:
            return 0 if dataset is None else len(dataset)

        return {
            "batch_size": self.micro.size, "logical_batch": self.logical_batch, "world_size": self.dist.world_size,
            "global_batch": self.global_batch, "total_steps": self.plan.total_steps, "steps_per_epoch": self.plan.steps_per_epoch,
            "epochs": round(self.plan.epochs, 4), "warmup_steps": self.plan.warmup_steps, "eval_steps": self.plan.eval_steps,
            "save_steps": self.plan.save_steps, "precision": self.device_info.precision,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "num_trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "num_train_pairs": count(self.data.train), "num_val_pairs": count(self.data.val), "num_test_pairs": count(self.data.test),
        }

    # ----------------------------------------------------------------------------------------- step
    def step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One optimizer step on one logical batch; returns the loss output (``loss``: the logical batch's) and ``grad_norm``."""
        # forward + backward; out of memory: the same logical batch again, in micro-batches half as large
        micro_batches = memory.split_batch(batch, self.micro.size)
        ok, out = memory.attempt(self._forward_backward, micro_batches)
        while not ok:
            self._after_out_of_memory()
            micro_batches = memory.split_batch(batch, self.micro.size)
            ok, out = memory.attempt(self._forward_backward, micro_batches)
        # one check (one wait for the device) per step: a NaN in any micro-batch makes the sum NaN, and raising
        # here, before the update, keeps the weights of the last good step
        self._check_finite(out["loss"])
        # several processes: DDP averaged the towers' gradients in the last backward; the rest are averaged here
        exact = self._exact(len(micro_batches))
        self.dist.average_gradients(trainable_parameters(self.optimizer) if exact else self._loss_only_parameters())
        # the update
        t = self.cfg.trainer
        self.scaler.unscale_(self.optimizer)
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.optimizer),
                                                          t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return out

    def _forward_backward(self, micro_batches: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Gradients of the logical batch's loss in ``.grad``; returns the loss output with the batch's loss."""
        if self._exact(len(micro_batches)):  # GradCache: the loss over the whole batch, its gradient pushed through each micro-batch
            return exact_accumulation_step(self.model, self._loss, micro_batches, device=self.device, autocast=self.device_info.autocast,
                                           loss_scale=self.scaler, logit_scale=self.model.logit_scale, prepare=self.to_device)
        total = sum(b["pixel_values"].shape[0] for b in micro_batches)
        loss_sum = None
        for i, micro_batch in enumerate(micro_batches):  # plain accumulation: micro-batch losses averaged by size
            with self.dist.gradient_sync(self.encoder, now=i == len(micro_batches) - 1):
                b = self.to_device(micro_batch)
                with self.device_info.autocast():
                    img, txt = self.encoder(b["pixel_values"], b["input_ids"], b["attention_mask"], b["text_index"])
                out = self._loss(img, txt, b["group_ids"], b["labels"], logit_scale=self.model.logit_scale)
                weight = b["pixel_values"].shape[0] / total
                self.scaler.scale(out["loss"] * weight).backward()
            part = out["loss"].detach() * weight
            loss_sum = part if loss_sum is None else loss_sum + part
        return {**out, "loss": loss_sum}

    def _exact(self, micro_batches: int) -> bool:
        """Exact (GradCache) accumulation: asked for, and the logical batch is in several micro-batches."""
        return self.cfg.trainer.accumulation == "exact" and micro_batches > 1

    def _loss(self, img: torch.Tensor, txt: torch.Tensor, group_ids: Optional[torch.Tensor] = None,
              labels: Optional[torch.Tensor] = None, logit_scale: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The loss over every rank's samples: embeddings (with their gradient), group ids and labels are gathered in
        rank order first, so negatives and positives span the global batch. One process: the loss itself."""
        return self.loss_fn(gather_with_grad(img), gather_with_grad(txt), group_ids=_gather(group_ids), labels=_gather(labels),
                            logit_scale=logit_scale)

    def _after_out_of_memory(self) -> None:
        """One process: halve the micro-batch (the logical batch stays) and tag the MLflow run. Under torchrun a rank
        cannot shrink its micro-batch alone (the others would wait in a collective of another shape): one line."""
        if self.dist.enabled:
            raise ConfigError("trainer.batch_size", self.micro.size,
                              f"too large: rank {self.dist.rank} ran out of memory at step {self.global_step + 1} (under torchrun the "
                              f"micro-batch is not halved automatically); lower it and raise trainer.gradient_accumulation_steps")
        self.optimizer.zero_grad(set_to_none=True)  # a half-done backward left partial gradients
        memory.free_memory(self.device)
        before = self.micro.size
        self.micro.halve()
        log.warning("out of memory at step %d with micro-batch %d; retrying the same logical batch with micro-batch %d",
                    self.global_step + 1, before, self.micro.size)
        self.tracker.set_tags({"oom_recovery": f"step {self.global_step + 1}: micro-batch {before} -> {self.micro.size}"})

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise NonFiniteLossError(f"the loss became {loss.item()} at step {self.global_step + 1}{where}; lower trainer.learning_rate, "
                                     f"raise loss.temperature or use device.precision=fp32")

    def _loss_only_parameters(self) -> List[torch.Tensor]:
        """Parameters only the loss uses (the model's and the loss's temperatures, SigLIP's bias): outside DDP."""
        return [p for p in (self.model.logit_scale, *self.loss_fn.parameters()) if p.requires_grad]

    # ----------------------------------------------------------------------------------------- loop
    def train(self) -> Dict[str, Dict[str, float]]:
        t, plan = self.cfg.trainer, self.plan
        if self.global_step == 0 and t.eval_at_start:
            self.evaluate("val")
        batches = self._logical_batches()
        window_loss, window_samples, window_start = [], 0, time.perf_counter()
        progress = tqdm(total=plan.total_steps, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=not (t.progress and self.dist.is_main))
        stop = self.global_step >= plan.total_steps
        with self._stop_on_signal():
            while not stop:
                # this step's learning rate and temperature
                self.model.train()
                lr = lr_at(self.global_step, t.learning_rate, plan.warmup_steps, plan.total_steps)
                set_lr(self.optimizer, lr)
                if self.temperature_schedule.schedule_type != "constant":
                    self.loss_fn.temperature = self.temperature_schedule.step(self.global_step)

                batch = next(batches)
                out = self.step(batch)
                self.global_step += 1
                self.batch_in_epoch += 1  # the position moves with the step it fed: an interrupted step is fed again on resume
                window_loss.append(float(out["loss"]))
                if self.temperature_schedule.schedule_type == "adaptive":  # every step's loss, once, before a checkpoint saves it
                    self.temperature_schedule.step(self.global_step, loss=window_loss[-1])
                window_samples += batch["pixel_values"].shape[0] * self.dist.world_size  # the global batch
                progress.update(1)

                # log the window since the last log: mean loss, samples per second
                if self.global_step % t.logging_steps == 0 or self.global_step == plan.total_steps:
                    samples_per_s = window_samples / max(time.perf_counter() - window_start, 1e-9)
                    self._log({
                        "train/loss": sum(window_loss) / len(window_loss), "train/lr": lr,
                        "train/temperature": float(out["temperature"]), "train/grad_norm": float(out["grad_norm"]),
                        "train/samples_per_s": samples_per_s, "train/epoch": self.epoch + self.batch_in_epoch / plan.steps_per_epoch,
                    })
                    progress.set_postfix(loss=f"{sum(window_loss) / len(window_loss):.4f}", samples_s=f"{samples_per_s:.0f}")
                    window_loss, window_samples, window_start = [], 0, time.perf_counter()

                stop = self._evaluate_and_save()
                if not stop and self.dist.any(self._stop_requested):  # every rank stops after the same step
                    self.save_checkpoint()
                    self.status = "KILLED"
                    progress.close()
                    log.warning("interrupted: stopped after step %d; checkpoint %s (resume with trainer.resume=%s)",
                                self.global_step, self.last_checkpoint, self.output_dir)
                    raise KeyboardInterrupt
        progress.close()
        self.finish()
        self.status = "FINISHED"
        return self.results

    def _logical_batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        """One logical batch per optimizer step, forever, epoch after epoch, from the position of the last step taken
        (``epoch``, ``batch_in_epoch``: what a checkpoint holds, so a resumed run feeds the same batches)."""
        while True:
            if self.batch_in_epoch >= self.plan.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
            self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.sampler.global_batch)
            self.data.train.set_epoch(self.epoch)
            yield from self.train_loader

    @contextlib.contextmanager
    def _stop_on_signal(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) or SIGTERM: the step in hand finishes, is saved, and the run stops (exactly resumable). A
        second signal stops at once (a KeyboardInterrupt; the last checkpoint written stays the one to resume)."""
        def request(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            log.warning("%s: stopping after this step (again to stop at once)", signal.Signals(signum).name)

        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _evaluate_and_save(self) -> bool:
        """After a step: evaluate every ``eval_steps`` (early stopping), checkpoint every ``save_steps``;
        both at the last step. Returns whether the run stops here."""
        t, plan, stop = self.cfg.trainer, self.plan, False
        last = self.global_step == plan.total_steps
        if self.global_step % plan.eval_steps == 0 or last:
            improved = self.evaluate("val")
            if t.early_stopping_patience and not improved and self.evals_without_improvement >= t.early_stopping_patience:
                log.info("early stopping at step %d: %s has not improved for %d evaluations", self.global_step, t.monitor,
                         self.evals_without_improvement)
                stop = True
        if self.global_step % plan.save_steps == 0 or last or stop:
            self.save_checkpoint()
        return stop or self.global_step >= plan.total_steps

    # ------------------------------------------------------------------------------------- evaluate
    def compute_metrics(self, split: str) -> Dict[str, Any]:
        """``{"metrics", "confusion", "embeddings"}`` of a split (see :meth:`Evaluator.metrics`)."""
        return self.evaluator.metrics(split, getattr(self.data, split))

    def _metrics_now(self, split: str, heads: bool = False) -> Dict[str, float]:
        """``split``'s metrics for the weights the model holds now; with ``val``, the eval_data set's too (and with
        ``heads``, the heads' ``val/<head>/...`` when ``eval.at_each_eval``)."""
        result = self.compute_metrics(split)
        metrics = dict(result["metrics"])
        if heads and split == "val":
            metrics.update(self.heads.val_metrics(result["embeddings"]))
        if split == "val" and self.extra_eval is not None:
            name, dataset, class_names, templates = self.extra_eval
            metrics.update(self.evaluator.metrics(name, dataset, class_names, templates)["metrics"])
        return metrics

    def evaluate(self, split: str = "val") -> bool:
        """Evaluate, log, track the best checkpoint. Returns whether the monitored metric improved."""
        t = self.cfg.trainer
        if getattr(self.data, split) is None:
            log.warning("no %s split (data.%s_split=0): skipping evaluation", split, split)
            return False
        metrics = self._metrics_now(split, heads=True)
        if self.ema is not None:  # the EMA weights, evaluated alongside: ema/val/...
            with self.ema.swapped(self.model):
                metrics.update({EMA_PREFIX + k: v for k, v in self._metrics_now(split).items()})
        self._log(metrics)
        label = "baseline" if self.global_step == 0 else f"step {self.global_step}"
        short = {(k[len(split) + 1:] if k.startswith(split + "/") else k): v for k, v in metrics.items() if "mean_rank" not in k}
        log.info("%s %s: %s", split, label, "  ".join(f"{k}={v:.4f}" for k, v in short.items()))
        if self.global_step == 0:
            self.results["baseline"] = dict(metrics)
        self.results["final"] = dict(metrics)
        value = metrics[t.monitor]  # (validate() checked that every evaluation logs it)
        better = self.best_value is None or (value > self.best_value if t.monitor_mode == "max" else value < self.best_value)
        if not better:
            self.evals_without_improvement += 1
            return False
        self.best_value, self.best_step = value, self.global_step
        self.evals_without_improvement = 0
        self.results["best"] = dict(metrics)
        if self.dist.is_main:  # the other ranks read it only in finish(), after rank 0 says it exists
            # the monitored weights: the EMA's for an ema/... monitor (the adapters alone under LoRA)
            with self._monitored_weights():
                checkpoint.save_best(self.ckpt_dir, saved_weights(self.model), self.loss_fn.state_dict(), self.global_step, t.monitor, value)
        self._log({f"best/{t.monitor}": value})
        return True

    def _monitored_weights(self):
        """A context in which the model holds the weights ``trainer.monitor`` measures (the EMA's for ``ema/...``)."""
        monitors_ema = str(self.cfg.trainer.monitor).startswith(EMA_PREFIX)
        return self.ema.swapped(self.model) if monitors_ema else contextlib.nullcontext(self.model)

    # ---------------------------------------------------------------------------------- checkpoints
    #: the loop's position and bookkeeping, saved as they are
    POSITION = ("global_step", "epoch", "batch_in_epoch", "best_value", "best_step", "evals_without_improvement", "history", "results")

    def state_dict(self) -> Dict[str, Any]:
        """Everything an exact resume needs, as plain types and tensors (loads with ``weights_only=True``)."""
        position = {key: checkpoint.plain(getattr(self, key)) for key in self.POSITION}
        position["step"] = position.pop("global_step")
        return {
            "model": saved_weights(self.model),  # the adapters alone under LoRA
            "robust": {"ema": self.ema.state_dict()} if self.ema is not None else {},
            "loss_fn": self.loss_fn.state_dict(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "temp_schedule": self.temperature_schedule.state_dict(), "loss_temperature": float(self.loss_fn.temperature),
            "oom": self.micro.state_dict(), **position, "rng": checkpoint.rng_state(),
            "run_id": getattr(self.tracker, "run_id", None), "config": OmegaConf.to_container(self.cfg, resolve=True),
            "format": checkpoint.FORMAT,
        }

    def load_state_dict(self, state: Dict[str, Any], changed: Sequence[str] = ()) -> None:
        """Put :meth:`state_dict`'s ``state`` back (the RNG states included). ``changed``: config keys the user allowed to
        differ from the checkpoint's; the loss's and the optimizer's states are then restored where they still fit (a
        different loss can have other parameters: those start afresh, with a warning), and a changed batch keeps the new
        batch size."""
        load_saved_weights(self.model, state["model"])
        if self.ema is not None:
            if "ema" not in state.get("robust", {}):
                raise ConfigError("trainer.ema.decay", self.cfg.trainer.ema.decay,
                                  "null: the checkpoint has no EMA weights (resume it without an EMA, or start a new run)")
            self.ema.load_state_dict(state["robust"]["ema"])
        for name, part in (("loss_fn", self.loss_fn), ("optimizer", self.optimizer), ("scaler", self.scaler),
                           ("temp_schedule", self.temperature_schedule)):
            try:
                part.load_state_dict(state[name])
            except (ValueError, RuntimeError, KeyError) as err:
                if not changed:
                    raise
                log.warning("resume: the %s state does not fit the changed config (%s); it starts afresh", name,
                            str(err).strip().splitlines()[0])
        if self.temperature_schedule.schedule_type != "constant":
            self.loss_fn.temperature = state["loss_temperature"]
        for key in self.POSITION:
            setattr(self, key, state["step" if key == "global_step" else key])
        checkpoint.set_rng_state(state["rng"])
        if not any(k.startswith(("trainer.batch_size", "trainer.gradient_accumulation_steps")) for k in changed):
            self.micro.load_state_dict(state["oom"])

    def save_checkpoint(self, wait: bool = True) -> Path:
        """Rank 0 writes the checkpoint; with ``wait`` every rank waits for it (a barrier)."""
        path = checkpoint.step_path(self.ckpt_dir, self.global_step)
        if self.dist.is_main:
            checkpoint.save_checkpoint(path, self.state_dict(), keep_last=self.cfg.trainer.keep_last)
        if wait:
            self.dist.barrier()
        if wait or self.dist.is_main:
            self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: Path, state: Optional[Dict[str, Any]] = None, changes: Sequence[tuple] = ()) -> Dict[str, Any]:
        """Restore ``path`` (``state``: already read; ``changes``: the (key, old, new) the user allowed)."""
        state = checkpoint.load_checkpoint(path, map_location=self.device) if state is None else state
        self.load_state_dict(state, [key for key, _, _ in changes])
        if self.dist.is_main:
            checkpoint.adopt_best(path, self.ckpt_dir)
        self.resumed_from = path
        self.last_checkpoint = path
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.global_step, self.epoch, self.batch_in_epoch)
        return state

    # ------------------------------------------------------------------------------------ finishing
    def finish(self) -> None:
        """Test evaluation with the best weights, then the outputs (plots, the model, ``metrics.json``), all logged.

        Before the test: LoRA adapters are merged, and with ``trainer.wise_ft.alphas`` each interpolation between
        the start and the best weights is evaluated; the selected one is then tested and saved. Several processes:
        every rank loads the best weights and takes part in the test evaluation; only rank 0 writes the outputs.
        """
        t = self.cfg.trainer
        best = self.ckpt_dir / checkpoint.BEST
        self.tested_step = self.global_step  # the step of the weights the test evaluates: test/* are logged there
        if self.dist.broadcast(best.is_file()):  # (rank 0 wrote it; the broadcast also waits for that)
            state = checkpoint.load_checkpoint(best, map_location=self.device)
            load_saved_weights(self.model, state["model"])
            self.loss_fn.load_state_dict(state["loss_fn"])
            self.tested_step = int(state["step"])
            log.info("test evaluation uses the best checkpoint (%s=%.4f at step %d)", state["monitor"], state["value"], state["step"])
        self.model = self.evaluator.model = merge_lora(self.model)  # LoRA: merged into plain weights
        wise = None
        if self.start_weights is not None:  # leaves the selected alpha's weights in the model
            monitor = t.monitor[len(EMA_PREFIX):] if str(t.monitor).startswith(EMA_PREFIX) else t.monitor
            wise = wise_ft(self.model, self.start_weights, list(t.wise_ft.alphas), lambda: self._metrics_now("val"), monitor,
                           t.wise_ft.select, t.monitor_mode)
            self._log(wise_ft_metrics(wise))
            self.results["wise_ft"] = wise
        split = "test" if self.data.test is not None else "val" if self.data.val is not None else None
        result = self.compute_metrics(split) if split is not None else None
        heads = self.heads.at_end(result, split)  # fitted on the training split, with the val / test embeddings above
        logged = dict(result["metrics"]) if result is not None and split == "test" else {}
        if logged:
            self.results["test"] = dict(logged)
        if heads is not None:
            self.results["heads"] = dict(heads.metrics)
            logged.update(heads.metrics)
        if logged:
            self._log(logged, step=self.tested_step)  # the heads' metrics with the test metrics, at the tested weights' step
        if self.dist.is_main:  # a full disk keeps the checkpoints (finishing.py)
            write_run_outputs(self._run_outputs(result, split, wise, heads), self.model, self.processor, self.loss_fn, self.tracker)

    def _run_outputs(self, result: Optional[Dict[str, Any]], split: Optional[str], wise: Optional[Dict[str, Any]],
                     heads: Any = None) -> RunOutputs:
        return RunOutputs(
            output_dir=self.output_dir, cfg=self.cfg, hydra_dir=self.hydra_dir, results=self.results, history=self.history,
            best_value=self.best_value, best_step=self.best_step, steps=self.global_step, tested_step=self.tested_step,
            result=result, split=split,
            dataset=getattr(self.data, split) if split else None, class_names=list(self.data.class_names), wise=wise,
            retention=self.extra_eval[0] if self.extra_eval else None, eval_batch_size=self.eval_batch_size,
            test_pairs=getattr(self.data.test, "pairs", None), best_checkpoint=self.ckpt_dir / checkpoint.BEST,
            last_checkpoint=self.last_checkpoint, heads=heads)

    def _log(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
        """Log ``metrics`` at ``step`` (default: the current step; test metrics: the step of the weights tested)."""
        step = self.global_step if step is None else step
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, float(v)))
        self.tracker.log_metrics(metrics, step=step)

    def cleanup(self, status: Optional[str] = None) -> None:
        stop_workers(getattr(self, "train_loader", None))
        if self.tracker is not None:
            self.tracker.end(status or self.status)


def _gather(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else gather_with_grad(t)


def train(cfg: DictConfig, output_dir: Optional[Path] = None, overrides: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    """Train one run config outside Hydra's CLI (tests, notebooks); returns the results dict."""
    trainer = Trainer(cfg, Path(output_dir or "outputs/api"), overrides)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
