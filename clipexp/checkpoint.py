"""Checkpoints and resume: what a checkpoint holds, atomic writes, latest / best / keep-last, RNG states.

Functions of paths and state dicts (no Hydra, no MLflow):

* :func:`trainer_state` / :func:`restore_trainer`: a trainer's model (its LoRA adapters alone under
  LoRA), weight EMA, loss, optimizer, GradScaler,
  temperature schedule, loop position (step, epoch, batch in the epoch), OOM-recovery state, best
  value, history, results, RNG states, MLflow run id and resolved config, and back.

* :func:`save_checkpoint`: ``step_NNNNNNN.pt`` written atomically (temp file + rename, so a crash never
  leaves half a file), then :func:`prune` keeps the last ``keep_last``; :func:`save_best` writes
  ``best.pt`` the same way.
* :func:`load_checkpoint`: the one function every resume path and the best-weights load go through.
* :func:`find_latest_checkpoint` / :func:`resolve_resume`: what ``trainer.resume=latest|<path>`` means.
* :func:`rng_state` / :func:`set_rng_state`: Python, NumPy and torch (CPU, CUDA) generators as plain
  types and tensors (NumPy's key as a list of ints), so a checkpoint holds nothing but containers of
  numbers, strings and tensors.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from omegaconf import OmegaConf

from clipexp.config import ConfigError

log = logging.getLogger(__name__)

BEST = "best.pt"
STEP_GLOB = "step_*.pt"


# --------------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Every generator a run draws from, as plain types and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state` (also the older form that held NumPy's own state tuple)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# What a checkpoint holds
# --------------------------------------------------------------------------------------------------

#: the trainer's loop position and bookkeeping, saved as they are
POSITION = ("step", "epoch", "batch_in_epoch", "best_value", "best_step", "evals_without_improvement", "history", "results")


def trainer_state(trainer) -> Dict[str, Any]:
    """Everything an exact resume of a :class:`~clipexp.train.Trainer` needs, as plain types and tensors."""
    return {
        # the model's share: the adapters alone under LoRA; the EMA weights under "robust"
        "model": trainer.robust.model_state(trainer.model), "robust": trainer.robust.state_dict(), "loss_fn": trainer.loss_fn.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
        "temp_schedule": trainer.temp_schedule.state_dict(), "loss_temperature": float(trainer.loss_fn.temperature),
        "oom": trainer.oom.state_dict(), **{key: getattr(trainer, key) for key in POSITION}, "rng": rng_state(),
        "run_id": getattr(trainer.tracker, "run_id", None), "config": OmegaConf.to_container(trainer.cfg, resolve=True),
    }


def restore_trainer(trainer, state: Dict[str, Any]) -> None:
    """Put :func:`trainer_state`'s ``state`` back into ``trainer`` (the RNG states included)."""
    trainer.robust.load_model_state(trainer.model, state["model"])
    trainer.robust.load_state_dict(state.get("robust", {}))
    trainer.loss_fn.load_state_dict(state["loss_fn"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.temp_schedule.load_state_dict(state["temp_schedule"])
    if trainer.cfg.loss.temperature_schedule != "constant":
        trainer.loss_fn.temperature = state["loss_temperature"]
    for key in POSITION:
        setattr(trainer, key, state[key])
    set_rng_state(state["rng"])
    trainer.oom.load_state_dict(state["oom"])


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def step_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``step_*.pt`` (``best.pt`` is never touched)."""
    for old in sorted(Path(ckpt_dir).glob(STEP_GLOB))[:-keep_last]:
        old.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: Dict[str, Any], keep_last: Optional[int] = None) -> Path:
    """Write ``state`` atomically to ``path``; with ``keep_last``, prune that folder's older steps."""
    atomic_save(state, Path(path))
    if keep_last is not None:
        prune(Path(path).parent, keep_last)
    return Path(path)


def save_best(ckpt_dir: Path, model_state: Dict[str, Any], loss_state: Dict[str, Any], step: int, monitor: str, value: float) -> Path:
    """``best.pt``: the weights (model and loss) at the best value of ``monitor`` so far."""
    return atomic_save({"model": model_state, "loss_fn": loss_state, "step": step, "monitor": monitor, "value": value},
                       Path(ckpt_dir) / BEST)


def adopt_best(resumed_from: Path, ckpt_dir: Path) -> None:
    """Resuming another run's checkpoint: copy its ``best.pt`` into this run's folder (if there is one)."""
    best = Path(resumed_from).parent / BEST
    if best.is_file() and best.parent != Path(ckpt_dir):
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        (Path(ckpt_dir) / BEST).write_bytes(best.read_bytes())


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device, None] = None) -> Dict[str, Any]:
    """The state dict saved at ``path``: the one reader of step and best checkpoints."""
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def find_latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """Newest ``step_*.pt`` in this run's folder, else in sibling runs under the same outputs root."""
    own = sorted((Path(output_dir) / "checkpoints").glob(STEP_GLOB))
    if own:
        return own[-1]
    root = Path(output_dir).parent.parent  # outputs/<date>/<time> -> outputs
    found = list(root.glob(f"*/*/checkpoints/{STEP_GLOB}")) + list(root.glob(f"*/*/*/checkpoints/{STEP_GLOB}"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_resume(resume: str, output_dir: Path, dist) -> Path:
    """The checkpoint ``trainer.resume`` names (``latest`` or a path), the same on every rank.

    Rank 0 resolves it and sends it to the others, which must be able to read the same file (outputs
    on a filesystem every node shares). Raises ConfigError with what to do when there is none.
    """
    path = None
    if dist.is_main:
        path = find_latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    path = dist.broadcast(path)
    if path is None or (dist.is_main and not path.is_file()):
        raise ConfigError("trainer.resume", resume, "latest (with a checkpoint under outputs/) or a checkpoint file path")
    if not path.is_file():
        raise ConfigError("trainer.resume", resume, f"a checkpoint every rank can read; rank 0 found {path} but rank "
                          f"{dist.rank} cannot: put the outputs on a filesystem every node shares")
    return path
