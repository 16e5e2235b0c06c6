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
* :func:`find_latest_checkpoint` / :func:`checkpoint_candidates`: the newest ``step_*.pt`` files;
  :mod:`clipexp.training.resume` decides which one ``trainer.resume=latest|<path>`` takes.
* :func:`rng_state` / :func:`set_rng_state`: Python, NumPy and torch (CPU, CUDA) generators as plain
  types and tensors (NumPy's key as a list of ints), so a checkpoint holds nothing but containers of
  numbers, strings and tensors.

What goes wrong, and what happens (README "What survives what"):

* Every read is ``torch.load(weights_only=True)``: a file holding any other pickled object (one whose
  unpickling could run code) is refused in one line naming it, before anything in it is built. A
  checkpoint of an older clipexp (numpy arrays inside) gets one line with the command that converts it
  (:func:`upgrade`, which allows numpy's array types and nothing else).
* Every checkpoint has a sha256 manifest beside it (``step_NNNNNNN.pt.sha256``, ``best.pt.sha256``), written
  with it; a file whose bytes no longer match (a flipped bit inside an intact zip) is damaged, as below.
  A checkpoint of an older clipexp, without a manifest, loads unchecked.
* A truncated or corrupt newest checkpoint: ``trainer.resume=latest`` names it in one warning and takes
  the newest readable one before it; a damaged file named explicitly, or no readable file at all, is
  one line saying which files and what to do. Never a silent fresh start.
* A write that fails (a full disk): the temp file is removed, the previous checkpoints are untouched,
  and :class:`CheckpointWriteError` says what failed, where, and which checkpoint to resume from.
* A resume whose config differs from the checkpoint's in anything that changes the maths (loss, batch,
  data, optimiser, ...) is refused with the keys that differ, unless ``trainer.resume_allow_changes``
  (``true``, or a list of keys or group prefixes) allows them; allowed changes are logged and tagged.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from omegaconf import OmegaConf

from clipexp.errors import ConfigError
from clipexp.paths import checksum_path, checksum_problem, sha256_file, write_checksum

log = logging.getLogger(__name__)

BEST = "best.pt"
STEP_GLOB = "step_*.pt"
FORMAT = 2  # 2: plain types and tensors only (loads with weights_only=True); 1 (no "format" key): numpy arrays inside


class CheckpointError(ConfigError):
    """A checkpoint ``trainer.resume`` cannot use: one line naming the file and what to do."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.key, self.value, self.allowed = "trainer.resume", None, message


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount): what, where, and what is intact."""


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
    """Everything an exact resume of a :class:`~clipexp.training.trainer.Trainer` needs, as plain types and tensors."""
    return {
        # the model's share: the adapters alone under LoRA; the EMA weights under "robust"
        "model": trainer.robust.model_state(trainer.model), "robust": trainer.robust.state_dict(), "loss_fn": trainer.loss_fn.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
        "temp_schedule": trainer.temp_schedule.state_dict(), "loss_temperature": float(trainer.loss_fn.temperature),
        "oom": trainer.oom.state_dict(), **{key: plain(getattr(trainer, key)) for key in POSITION}, "rng": rng_state(),
        "run_id": getattr(trainer.tracker, "run_id", None), "config": OmegaConf.to_container(trainer.cfg, resolve=True),
        "format": FORMAT,
    }


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made Python numbers and lists (what weights_only loads)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def restore_trainer(trainer, state: Dict[str, Any], changed: Sequence[str] = ()) -> None:
    """Put :func:`trainer_state`'s ``state`` back into ``trainer`` (the RNG states included).

    ``changed``: config keys the user allowed to differ from the checkpoint's. The loss's and the
    optimizer's states are then restored where they still fit (a different loss can have other
    parameters: those start afresh, with a warning), and a changed batch keeps the new batch size.
    """
    trainer.robust.load_model_state(trainer.model, state["model"])  # the adapters alone under LoRA
    trainer.robust.load_state_dict(state.get("robust", {}))  # the EMA weights
    parts = [("loss_fn", trainer.loss_fn), ("optimizer", trainer.optimizer), ("scaler", trainer.scaler),
             ("temp_schedule", trainer.temp_schedule)]
    for name, part in parts:
        try:
            part.load_state_dict(state[name])
        except (ValueError, RuntimeError, KeyError) as err:
            if not changed:
                raise
            log.warning("resume: the %s state does not fit the changed config (%s); it starts afresh", name, _first_line(err))
    if trainer.cfg.loss.temperature_schedule != "constant":
        trainer.loss_fn.temperature = state["loss_temperature"]
    for key in POSITION:
        setattr(trainer, key, state[key])
    set_rng_state(state["rng"])
    if not any(k.startswith(("trainer.batch_size", "trainer.gradient_accumulation_steps")) for k in changed):
        trainer.oom.load_state_dict(state["oom"])


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file.

    A failed write (``OSError``: a full disk, a lost mount) removes the temp file, leaves every earlier
    checkpoint as it was and raises :class:`CheckpointWriteError` saying what, where and what is intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        digest = sha256_file(tmp)
        # the old manifest goes first: a crash before the new one is written leaves an unchecked file, never a false mismatch
        checksum_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
        write_checksum(path, digest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(path, err)) from None
    return path


def _write_failure(path: Path, err: OSError) -> str:
    what = errno.errorcode.get(err.errno, "") if err.errno else ""
    why = f"{err.strerror or err}" + (f" ({what})" if what else "")
    previous = [p for p in sorted(path.parent.glob(STEP_GLOB)) if p != path]
    kept = (f"the previous checkpoint {previous[-1]} is intact: free space in {path.parent} and resume with "
            f"trainer.resume={previous[-1]}") if previous else f"no earlier checkpoint in {path.parent}: free space there and run again"
    return f"could not write the checkpoint {path}: {why}; nothing half-written was left in {path.parent}, {kept}"


def step_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``step_*.pt`` (``best.pt`` is never touched)."""
    for old in sorted(Path(ckpt_dir).glob(STEP_GLOB))[:-keep_last]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)


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
        checksum_path(Path(ckpt_dir) / BEST).unlink(missing_ok=True)
        (Path(ckpt_dir) / BEST).write_bytes(best.read_bytes())
        if checksum_path(best).is_file():
            checksum_path(Path(ckpt_dir) / BEST).write_bytes(checksum_path(best).read_bytes())


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device, None] = None) -> Dict[str, Any]:
    """The state dict saved at ``path``: the one reader of step and best checkpoints.

    ``torch.load(weights_only=True)``: tensors and plain containers only, so no object in the file is
    ever built. Raises :class:`CheckpointError` (one line) for a file holding anything else (an older
    clipexp's numpy arrays: with the command that converts it) and :class:`DamagedCheckpoint` for a
    file that is truncated or corrupt, or differs from its sha256 manifest (checked first, when there is one).
    """
    path = Path(path)
    try:
        mismatch = checksum_problem(path) if path.is_file() else None
    except OSError as err:
        raise DamagedCheckpoint(path, err) from None
    if mismatch:
        raise DamagedCheckpoint(path, ValueError(mismatch))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise DamagedCheckpoint(path, err) from None
        if all(_is_numpy(name) for name in unsafe):
            raise CheckpointError(f"trainer.resume: {path} was written by an older clipexp (it holds numpy arrays, which this "
                                  f"version does not unpickle); convert it once with `clipexp upgrade "
                                  f"{path}` and resume again") from None
        raise CheckpointError(f"trainer.resume: {path} holds pickled objects that could run code when loaded "
                              f"({', '.join(unsafe)}); clipexp loads only tensors and plain values, so it refuses this file: "
                              f"resume from a checkpoint clipexp wrote, or start without trainer.resume") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise DamagedCheckpoint(path, err) from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(path, ValueError("not a clipexp checkpoint (no state dict inside)"))
    return state


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file that is truncated or corrupt (``why``: the reader's first line)."""

    def __init__(self, path: Path, err: BaseException):
        first = _first_line(err).split(". ")[0]
        if "legacy .tar format" in first:  # what torch says of a file that is no zip archive at all
            first = "not the zip archive torch.save writes"
        self.path, self.why = Path(path), f"truncated or corrupt: {first}"
        super().__init__(f"trainer.resume: {path} is unreadable ({self.why})")


def _unsafe_globals(path: Path) -> List[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not even a readable archive: damaged, not unsafe
        return []


def _is_numpy(name: str) -> bool:
    return name.split(".")[0] == "numpy" and name.rsplit(".", 1)[-1] in {"_reconstruct", "ndarray", "dtype", "scalar"} \
        or name.startswith("numpy.dtypes.")


def checkpoint_candidates(run_dir: Path) -> List[Path]:
    """``step_*.pt`` of one run folder (its ``checkpoints/``), newest step first. Only that folder: a run never
    picks another run's files (a sibling under the same outputs root may be someone else's experiment)."""
    return sorted((Path(run_dir) / "checkpoints").glob(STEP_GLOB), reverse=True)


def find_latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest ``step_*.pt`` in this run folder, or None."""
    found = checkpoint_candidates(run_dir)
    return found[0] if found else None


# --------------------------------------------------------------------------------------------------
# Older checkpoints
# --------------------------------------------------------------------------------------------------


def upgrade(path: Path) -> Path:
    """Rewrite an older clipexp checkpoint (numpy arrays inside) in the current format, in place (the
    original kept as ``<name>.old``). Loads with weights_only=True allowing numpy's array types only,
    so a file holding anything else is still refused."""
    path = Path(path)
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.int32, np.bool_)]
    with torch.serialization.safe_globals([core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"{path} holds objects other than tensors, plain values and numpy arrays "
                                  f"({', '.join(_unsafe_globals(path))}): not a clipexp checkpoint, not converted") from None
    state["rng"] = {**state["rng"], "numpy": plain(state["rng"]["numpy"])}
    state = {k: v if k in ("model", "loss_fn", "optimizer", "scaler") else plain(v) for k, v in state.items()}
    state["format"] = FORMAT
    backup = path.with_name(path.name + ".old")
    os.replace(path, backup)
    atomic_save(state, path)
    return backup


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":  # python -m clipexp.training.checkpoint upgrade <checkpoint.pt> ...
    if len(sys.argv) < 3 or sys.argv[1] != "upgrade":
        sys.exit("usage: python -m clipexp.training.checkpoint upgrade <checkpoint.pt> [...]")
    for name in sys.argv[2:]:
        try:
            print(f"upgraded {name} (the original is {upgrade(Path(name))})")
        except CheckpointError as err:
            sys.exit(f"clipexp: error: {err}")
