"""The training recipe: plain PyTorch, readable top to bottom (setup, the step, the loop and finish in one file, in order).

:class:`Trainer` is ``setup`` -> ``train`` -> ``cleanup``. ``setup`` calls one small builder per concern, each in the
module that owns it (device, models, training.data, losses, batch_size, optim, evaluate, checkpoint, outputs;
:mod:`clipexp.training.distributed` is the identity in one process). ``train`` is the loop: the step's learning rate
and temperature, one logical batch (:meth:`Trainer._accumulate`: plain or exact accumulation; under torchrun the loss
sees every rank's samples), unscale / clip / step, logging (samples/s since the last log), evaluation (step 0 = the
baseline) and checkpoints; ``finish`` evaluates the test split with the best weights and writes the outputs. The Hydra
task around it (exit codes, sweeps, failing ranks) is :func:`clipexp.training.task.run`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from clipexp.config.validate import validate
from clipexp.device import build_device
from clipexp.errors import ConfigError
from clipexp.evaluate import Evaluator
from clipexp.losses import build_loss
from clipexp.losses.distributed import gather_with_grad
from clipexp.models.training import DualEncoder, build_training_model, quiet_transformers
from clipexp.tracking.outputs import derived_params, run_tags, start_tracking
from clipexp.training import checkpoint, distributed
from clipexp.training.batch_size import train_batch_size
from clipexp.training.data import (DeviceBatches, EpochSampler, build_data, build_eval_data, build_train_loader, stop_workers,
                                    text_has_dropout)
from clipexp.training.distributed import DistContext
from clipexp.training.finishing import write_run_outputs
from clipexp.training.gradcache import exact_accumulation_step
from clipexp.training.oom import OOMRecovery, is_oom, split_batch
from clipexp.training.optim import build_optimizer, build_temperature_schedule, fit_step_settings, lr_at, set_lr, trainable_parameters
from clipexp.training.resume import describe_changes, resume_checkpoint
from clipexp.training.robust import EMA_PREFIX, RobustFineTuning, wise_ft_metrics

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf. One line naming the step and the last good checkpoint."""


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
        quiet_transformers()
        self.dist = distributed.init_distributed(cfg.device.type, t.dist_timeout_s)  # single process: no-op
        checkpoint.seed_everything(cfg.seed)
        self.devices = build_device(cfg.device, distributed=self.dist.enabled)
        self.device, self.dev = self.devices.device, self.devices.info
        if self.dist.enabled:
            log.info("distributed: %s", self.dist.describe())

        self.robust = RobustFineTuning(cfg)  # LoRA, EMA, WiSE-FT (README "Robust fine-tuning")
        self.model, self.processor = build_training_model(cfg.model, cfg.device, self.device, prepare=self.robust.prepare_model)
        self.data = build_data(cfg, self.processor)  # (a built model's weights follow the seed)
        self.extra_eval = build_eval_data(cfg, self.processor)  # (name, dataset, classes, prompts) or None
        self.dedup_captions = bool(t.pack_captions) and not text_has_dropout(self.model)  # one dropout mask for all copies otherwise
        self.to_device = DeviceBatches(self.device, self.data.train.image_transform, t.pack_captions, self.dedup_captions)
        loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
        self.loss_fn = build_loss(loss_cfg["name"], **loss_cfg).to(self.device)  # (before the batch-size probe, which runs it)
        self._setup_batches()
        self.temp_schedule = build_temperature_schedule(cfg.loss, self.total_steps)
        self.optimizer, self.scaler = build_optimizer(t, self.model, self.loss_fn, self.dev.type, self.dev.use_grad_scaler)
        self.robust.start_ema(self.model)
        self.evaluator = Evaluator(
            self.model, self.loss_fn, self.processor, prepare=self.to_device, collate=self.collate, autocast=self.dev.autocast,
            dist=self.dist, device=self.device, batch_size=self.eval_batch_size, max_length=cfg.model.max_sequence_length,
            class_names=self.data.class_names, templates=cfg.domain.prompt_templates)

        found = resume_checkpoint(cfg, self.output_dir, self.dist, self.device) if t.resume else None  # before tracking: it names the run
        resumed = self.load_checkpoint(*found) if found else None
        # the module the step runs: the two towers, under DDP with several processes, except for exact
        # accumulation of several micro-batches (GradCache runs the towers itself and averages once, in _accumulate)
        exact = t.accumulation == "exact" and t.gradient_accumulation_steps > 1
        self.encoder = DualEncoder(self.model) if exact else self.dist.wrap(DualEncoder(self.model), self.device)
        derived = derived_params(self)
        self.tracker = start_tracking(
            cfg, enabled=cfg.tracking.enabled and self.dist.is_main, overrides=self.overrides, output_dir=self.output_dir,
            tags=run_tags(cfg, self.overrides, self.output_dir, self.dev, self.extra_tags), derived=derived, data=self.data,
            resume=None if resumed is None else {"run_id": resumed.get("run_id"), "from": self.resumed_from, "step": self.step,
                                                 "changes": self.resume_changes})
        log.info("train %d / val %d / test %d pairs; %d steps (%d per epoch) of %d samples (%s accumulation); outputs in %s",
                 derived["num_train_pairs"], derived["num_val_pairs"], derived["num_test_pairs"], self.total_steps,
                 self.steps_per_epoch, self.global_batch, t.accumulation, self.output_dir)
        return self

    def _setup_batches(self) -> None:
        """Micro-batch (rank 0 resolves it, every rank uses it) x accumulation = logical batch; x world size
        = global batch; the run's length; the sampler (every rank its slice of one permutation) and loader."""
        cfg, t, world = self.cfg, self.cfg.trainer, self.dist.world_size
        found = train_batch_size(cfg, self.model, self.loss_fn, self.dev, self.device) if self.dist.is_main else None
        self.batch_size, how = self.dist.broadcast(found)
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
        self.sampler = EpochSampler(n_train, min(self.logical_batch, max(1, n_train // world)), max(1, n_train // self.global_batch),
                                    cfg.seed, shuffle=cfg.data.shuffle, rank=self.dist.rank, world_size=world)
        self.train_loader = build_train_loader(self.data.train, self.sampler, cfg.data.num_workers, self.dev.type, self.dist.local_world_size)
        self.collate = self.train_loader.collate_fn
        self.steps_per_epoch = getattr(self.train_loader, "steps_per_epoch", self.sampler.num_batches)  # a stream: what its shards hold
        self.total_steps = fit_step_settings(t, t.max_steps or t.num_epochs * self.steps_per_epoch)  # warm-up, eval, save fit it
        self.eval_batch_size = t.eval_batch_size or max(self.batch_size, 32)

    # ----------------------------------------------------------------------------------------- step
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

    def _forward_loss(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        b = self.to_device(batch)
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
                                          loss_scale=self.scaler, logit_scale=self.model.logit_scale, prepare=self.to_device)
            self._check_finite(out["loss"])
            self.dist.average_gradients(trainable_parameters(self.optimizer))
            return out
        total = sum(b["pixel_values"].shape[0] for b in micro_batches)
        loss_sum = None
        for i, batch in enumerate(micro_batches):
            with self.dist.gradient_sync(self.encoder, now=i == len(micro_batches) - 1):
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

    def _loss_only_parameters(self) -> List[torch.Tensor]:
        """Parameters only the loss uses (the model's and the loss's temperatures, SigLIP's bias): outside DDP."""
        return [p for p in (self.model.logit_scale, *self.loss_fn.parameters()) if p.requires_grad]

    def _run_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One logical batch with OOM recovery (one process: halve the micro-batch, tag the MLflow run).
        Under torchrun a rank cannot shrink its micro-batch alone (the others would wait in a collective
        of another shape), so an OOM stops the run with what to change."""
        if not self.dist.enabled:
            micro_before = self.oom.micro
            out = self.oom.run(self._accumulate, batch, cleanup=self._on_oom_cleanup)
            if self.oom.micro != micro_before:
                self.tracker.set_tags({"oom_recovery": f"step {self.step + 1}: micro-batch {micro_before} -> {self.oom.micro}"})
            return out
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

    # ----------------------------------------------------------------------------------------- loop
    def train(self) -> Dict[str, Dict[str, float]]:
        t = self.cfg.trainer
        if self.step == 0 and t.eval_at_start:
            self.evaluate("val")
        batches = self._logical_batches()
        window_loss, window_samples, window_start = [], 0, time.perf_counter()
        progress = _progress(self.total_steps, self.step, enabled=t.progress and self.dist.is_main)
        stop = self.step >= self.total_steps
        try:
            while not stop:
                # this step's learning rate and temperature
                self.model.train()
                lr = lr_at(self.step, t.learning_rate, t.warmup_steps, self.total_steps)
                set_lr(self.optimizer, lr)
                if self.cfg.loss.temperature_schedule != "constant":
                    self.loss_fn.temperature = self.temp_schedule.step(self.step, loss=window_loss[-1] if window_loss else None)

                # forward + backward of one logical batch, then the update
                batch = next(batches)
                out = self._run_step(batch)
                step_loss = float(out["loss"])
                window_samples += batch["pixel_values"].shape[0] * self.dist.world_size  # the global batch
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.optimizer),
                                                           t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.robust.after_step(self.model)  # the weight EMA
                self.step += 1
                window_loss.append(step_loss)
                progress.update(1)

                # log the window since the last log: mean loss, samples per second
                if self.step % t.logging_steps == 0 or self.step == self.total_steps:
                    samples_per_s = window_samples / max(time.perf_counter() - window_start, 1e-9)
                    self._log({
                        "train/loss": sum(window_loss) / len(window_loss), "train/lr": lr,
                        "train/temperature": float(out["temperature"]), "train/grad_norm": float(grad_norm),
                        "train/samples_per_s": samples_per_s, "train/epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                    })
                    progress.set_postfix(loss=f"{sum(window_loss) / len(window_loss):.4f}", samples_s=f"{samples_per_s:.0f}")
                    window_loss, window_samples, window_start = [], 0, time.perf_counter()

                stop = self._evaluate_and_save()
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

    def _evaluate_and_save(self) -> bool:
        """After a step: evaluate every ``eval_steps`` (early stopping), checkpoint every ``save_steps``;
        both at the last step. Returns whether the run stops here."""
        t, stop = self.cfg.trainer, False
        if self.step % t.eval_steps == 0 or self.step == self.total_steps:
            improved = self.evaluate("val")
            if t.early_stopping_patience and not improved and self.evals_without_improvement >= t.early_stopping_patience:
                log.info("early stopping at step %d: %s has not improved for %d evaluations", self.step, t.monitor, self.evals_without_improvement)
                stop = True
        if self.step % t.save_steps == 0 or self.step == self.total_steps or stop:
            self.save_checkpoint()
        return stop or self.step >= self.total_steps

    # ------------------------------------------------------------------------------------- evaluate
    def compute_metrics(self, split: str) -> Dict[str, Any]:
        """``{"metrics", "confusion", "embeddings"}`` of a split (see :meth:`Evaluator.metrics`)."""
        return self.evaluator.metrics(split, getattr(self.data, split))

    def _metrics_now(self, split: str) -> Dict[str, float]:
        """``split``'s metrics for the weights the model holds now; with ``val``, the eval_data set's too."""
        metrics = dict(self.compute_metrics(split)["metrics"])
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
        metrics = self._metrics_now(split)
        if self.robust.ema is not None:  # the EMA weights, evaluated alongside: ema/val/...
            with self.robust.ema.swapped(self.model):
                metrics.update({EMA_PREFIX + k: v for k, v in self._metrics_now(split).items()})
        self._log(metrics)
        label = "baseline" if self.step == 0 else f"step {self.step}"
        short = {(k[len(split) + 1:] if k.startswith(split + "/") else k): v for k, v in metrics.items() if "mean_rank" not in k}
        log.info("%s %s: %s", split, label, "  ".join(f"{k}={v:.4f}" for k, v in short.items()))
        if self.step == 0:
            self.results["baseline"] = dict(metrics)
        self.results["final"] = dict(metrics)
        if t.monitor not in metrics:
            raise ConfigError("trainer.monitor", t.monitor, "one of " + ", ".join(sorted(metrics)))
        value = metrics[t.monitor]
        better = self.best_value is None or (value > self.best_value if t.monitor_mode == "max" else value < self.best_value)
        if not better:
            self.evals_without_improvement += 1
            return False
        self.best_value, self.best_step = value, self.step
        self.evals_without_improvement = 0
        self.results["best"] = dict(metrics)
        if self.dist.is_main:  # the other ranks read it only in finish(), after rank 0 says it exists
            # the monitored weights: the EMA's for an ema/... monitor (the adapters alone under LoRA)
            with self.robust.monitored_weights(self.model):
                checkpoint.save_best(self.ckpt_dir, self.robust.model_state(self.model), self.loss_fn.state_dict(), self.step, t.monitor, value)
        self._log({f"best/{t.monitor}": value})
        return True

    # ---------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, wait: bool = True) -> Path:
        """Rank 0 writes the checkpoint; with ``wait`` every rank waits for it (a barrier). The
        interrupt path passes ``wait=False``: the ranks may be stopped at different points."""
        path = checkpoint.step_path(self.ckpt_dir, self.step)
        if self.dist.is_main:
            checkpoint.save_checkpoint(path, checkpoint.trainer_state(self), keep_last=self.cfg.trainer.keep_last)
        if wait:
            self.dist.barrier()
        if wait or self.dist.is_main:
            self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: Path, state: Optional[Dict[str, Any]] = None, changes: Sequence[tuple] = ()) -> Dict[str, Any]:
        """Restore ``path`` (``state``: already read; ``changes``: the (key, old, new) the user allowed)."""
        state = checkpoint.load_checkpoint(path, map_location=self.device) if state is None else state
        checkpoint.restore_trainer(self, state, [key for key, _, _ in changes])
        self.resume_changes = describe_changes(changes)
        if self.dist.is_main:
            checkpoint.adopt_best(path, self.ckpt_dir)
        self.resumed_from = path
        self.last_checkpoint = path
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
        return state

    # ------------------------------------------------------------------------------------ finishing
    def finish(self) -> None:
        """Test evaluation with the best weights, plots, the model, the metrics JSON; all logged.

        Before the test: LoRA adapters are merged, and with ``trainer.wise_ft.alphas`` each interpolation
        between the start and the best weights is evaluated; the selected one is then tested and saved.

        Several processes: every rank loads the best weights and takes part in the test evaluation;
        only rank 0 writes the outputs.
        """
        best = self.ckpt_dir / checkpoint.BEST
        if self.dist.broadcast(best.is_file()):  # (rank 0 wrote it; the broadcast also waits for that)
            state = checkpoint.load_checkpoint(best, map_location=self.device)
            self.robust.load_model_state(self.model, state["model"])
            self.loss_fn.load_state_dict(state["loss_fn"])
            log.info("test evaluation uses the best checkpoint (%s=%.4f at step %d)", state["monitor"], state["value"], state["step"])
        self.model = self.evaluator.model = self.robust.final_model(self.model)  # LoRA: merged into plain CLIPModel weights
        wise = self.robust.wise_ft(self.model, lambda: self._metrics_now("val"))  # leaves the selected alpha's weights
        if wise is not None:
            self._log(wise_ft_metrics(wise))
            self.results["wise_ft"] = wise
        split = "test" if self.data.test is not None else "val" if self.data.val is not None else None
        result = self.compute_metrics(split) if split is not None else None
        if result is not None and split == "test":
            self._log(result["metrics"])
            self.results["test"] = dict(result["metrics"])
        if self.dist.is_main:  # plots, metrics.json, model/, the MLflow model; a full disk keeps the checkpoints (finishing.py)
            write_run_outputs(self, result, split, wise)

    def _log(self, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((self.step, float(v)))
        self.tracker.log_metrics(metrics, step=self.step)

    def cleanup(self, status: Optional[str] = None) -> None:
        stop_workers(getattr(self, "train_loader", None))
        if self.tracker is not None:
            self.tracker.end(status or self.status)


def _gather(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else gather_with_grad(t)


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def train(cfg: DictConfig, output_dir: Optional[Path] = None, overrides: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    """Train one run config outside Hydra's CLI (tests, notebooks); returns the results dict."""
    trainer = Trainer(cfg, Path(output_dir or "outputs/api"), overrides)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()

