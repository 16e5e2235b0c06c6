"""Checkpoint files: writing them whole, reading them safely, choosing the one to resume from.

What a checkpoint *holds* is the trainer's decision (:meth:`clipexp.training.trainer.Trainer.state_dict`);
this module only moves state dicts to and from files (no Hydra, no MLflow):

* :func:`save_checkpoint` / :func:`save_best`: ``step_NNNNNNN.pt`` and ``best.pt`` written atomically (temp file
  + rename, :func:`clipexp.files.atomic_write`) with a sha256 manifest beside each; the last ``keep_last``
  step checkpoints are kept. A write that fails (a full disk, a quota, a read-only folder) removes the temp file,
  leaves every earlier checkpoint as it was and raises :class:`~clipexp.errors.WriteError` naming the last good one.
* :func:`load_checkpoint`: every read is ``torch.load(weights_only=True)``, checked against its manifest first:
  a file holding any other pickled object is refused before anything in it is built, an older clipexp's
  checkpoint (numpy arrays inside) gets the command that converts it (:func:`upgrade`), a truncated, corrupt or
  altered file is :class:`DamagedCheckpoint`.
* :func:`pick_checkpoint` / :func:`resume_checkpoint`: what ``trainer.resume=latest|latest_or_new|<run dir>|<file>``
  resumes from; a damaged newest checkpoint is named in a warning and the one before it taken, never a silent
  fresh start.
* :func:`check_config`: the checkpoint's config against this run's. Keys that change what is computed must
  match unless ``trainer.resume_allow_changes`` allows them; keys that say where the run logs, how fast it goes
  or how long it runs (:data:`MAY_CHANGE`) may change and are logged.
* :func:`rng_state` / :func:`set_rng_state`: Python, NumPy and torch generators as plain types and tensors.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from omegaconf import OmegaConf

from clipexp.errors import CheckpointError, ConfigError, UserError, WriteError
from clipexp.files import atomic_write, checksum_path, checksum_problem, describe_os_error, sha256_file, write_checksum, write_error

log = logging.getLogger(__name__)

BEST = "best.pt"
STEP_GLOB = "step_*.pt"
FORMAT = 2  # 2: plain types and tensors only (loads with weights_only=True); 1 (no "format" key): numpy arrays inside
LATEST, LATEST_OR_NEW = "latest", "latest_or_new"


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file that is truncated or corrupt (``why``: the reader's first line)."""

    def __init__(self, path: Path, err: BaseException):
        first = _first_line(err).split(". ")[0]
        if "legacy .tar format" in first:  # what torch says of a file that is no zip archive at all
            first = "not the zip archive torch.save writes"
        self.path, self.why = Path(path), f"truncated or corrupt: {first}"
        super().__init__(f"trainer.resume: {path} is unreadable ({self.why})")


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
# Writing
# --------------------------------------------------------------------------------------------------


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


def atomic_save(obj: Any, path: Path) -> Path:
    """``torch.save`` through a temp file beside ``path``, its sha256 manifest beside it; a crash never leaves
    half a file. A failed write (torch's writer reports a full disk as a RuntimeError, the OS as an OSError)
    removes the temp file, leaves every earlier checkpoint as it was and raises :class:`WriteError` saying
    what, where and what is intact."""
    path = Path(path)
    digest: List[str] = []

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a Python file: a refused write raises its OSError (ENOSPC, EFBIG, EROFS) into the
            torch.save(obj, f)      # chain; torch's own file writer only says "iostream error" / "unexpected pos"
        digest.append(sha256_file(tmp))
        # the old manifest goes first: a crash before the new one is written leaves an unchecked file, never a false mismatch
        checksum_path(path).unlink(missing_ok=True)

    try:
        atomic_write(path, write)
        write_checksum(path, digest[0])
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a failed write
        why = _write_failure(err)
        if why is None:
            raise
        raise WriteError(f"could not write the checkpoint {path}: {why}; nothing half-written was left in {path.parent}, "
                         f"{_intact(path)}") from None
    return path


def _write_failure(err: BaseException) -> Optional[str]:
    """Why a write failed, when ``err`` is a failed write (an OSError in its chain, or torch's zip writer failing)."""
    os_err = write_error(err)
    if os_err is not None:
        return describe_os_error(os_err)
    text = str(err)
    if isinstance(err, RuntimeError) and ("PytorchStreamWriter" in text or "file write failed" in text):
        return _first_line(err)
    return None


def _intact(path: Path) -> str:
    previous = [p for p in sorted(path.parent.glob(STEP_GLOB)) if p != path]
    if previous:
        return f"the previous checkpoint {previous[-1]} is intact: free space in {path.parent} and resume with trainer.resume={previous[-1]}"
    return f"no earlier checkpoint in {path.parent}: free space there and run again"


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
# Choosing what to resume from, and whether it may be resumed with this config
# --------------------------------------------------------------------------------------------------


def pick_checkpoint(resume: str, output_dir: Path, map_location=None) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``trainer.resume`` -> (path, state), or None for ``latest_or_new`` with nothing to resume.

    ``latest`` / ``latest_or_new``: the newest readable step checkpoint of *this* run's folder; a run folder
    (``trainer.resume=<run dir>``): the newest readable one there; a file: that checkpoint. ``latest`` skips
    damaged files (one warning each, naming the one taken instead); an explicit file must itself be readable.
    No other folder is ever searched."""
    explicit = resume not in (LATEST, LATEST_OR_NEW) and Path(resume).is_file()
    folder = Path(output_dir) if resume in (LATEST, LATEST_OR_NEW) else Path(resume)
    paths = [Path(resume)] if explicit else checkpoint_candidates(folder)
    if not paths and resume == LATEST_OR_NEW:
        log.info("resume: no checkpoint in %s yet; starting a new run (trainer.resume=latest_or_new)", folder / "checkpoints")
        return None
    if not paths:
        where = f"this run's folder has no checkpoint ({folder / 'checkpoints'})" if resume in (LATEST, LATEST_OR_NEW) else \
            f"{resume} is neither a checkpoint file nor a run folder with checkpoints/step_*.pt"
        raise ConfigError("trainer.resume", resume, f"{where}; resume a run with trainer.resume=<its run folder or checkpoint "
                          f"file> (or hydra.run.dir=<its folder> trainer.resume=latest), or use trainer.resume=latest_or_new "
                          f"to start fresh when there is none")
    damaged: List[DamagedCheckpoint] = []
    for path in paths if not explicit else paths + [p for p in sorted(paths[0].parent.glob(STEP_GLOB), reverse=True) if p != paths[0]]:
        try:
            state = load_checkpoint(path, map_location)
        except DamagedCheckpoint as err:
            damaged.append(err)
            continue
        if explicit and damaged:  # the named file is damaged; ``path`` is the newest good one beside it
            raise CheckpointError(f"{damaged[0]}; the newest readable checkpoint beside it is {path}: resume with "
                                  f"trainer.resume={path}")
        for bad in damaged:
            log.warning("resume: checkpoint %s is unreadable (%s); resuming from the previous one, %s", bad.path, bad.why, path)
        return path, state
    if explicit:
        raise CheckpointError(f"{damaged[0]}; no other checkpoint beside it is readable: start without trainer.resume")
    raise CheckpointError(f"trainer.resume={resume}: no readable checkpoint: {', '.join(str(d.path) for d in damaged)} are all "
                          f"truncated or corrupt; start without trainer.resume, or point it at a good copy")


def resume_checkpoint(cfg, output_dir: Path, dist, map_location=None) -> Optional[Tuple[Path, Dict[str, Any], List[Tuple[str, Any, Any]]]]:
    """What ``trainer.resume=latest|latest_or_new|<run dir>|<file>`` resumes from: (path, state, the allowed
    (key, old, new) changes), or None when ``latest_or_new`` finds nothing to resume.

    Rank 0 picks the file (skipping damaged ones, see :func:`pick_checkpoint`) and sends its path
    to the others, which must be able to read the same file (outputs on a filesystem every node
    shares). The checkpoint's config must match this run's (:func:`config_changes`) unless the user
    allows the difference with ``trainer.resume_allow_changes``.
    """
    resume = cfg.trainer.resume
    path, state, refusal = None, None, None
    if dist.is_main:
        try:
            picked = pick_checkpoint(resume, output_dir, map_location)
            path, state = picked if picked is not None else ("", None)
        except UserError as err:
            refusal = err
    path, message = dist.broadcast((path, None if refusal is None else str(refusal)))  # every rank stops alike
    if refusal is not None:
        raise refusal
    if message is not None:
        raise CheckpointError(message)
    if path == "":  # latest_or_new with nothing to resume: a new run
        return None
    if state is None:
        if not Path(path).is_file():
            raise ConfigError("trainer.resume", resume, f"a checkpoint every rank can read; rank 0 found {path} but rank "
                              f"{dist.rank} cannot: put the outputs on a filesystem every node shares")
        state = load_checkpoint(path, map_location)
    changed = check_config(state.get("config") or {}, OmegaConf.to_container(cfg, resolve=True), cfg.trainer.resume_allow_changes, path)
    return path, state, changed


#: keys that say where a run logs or how fast it goes, not what it computes: never compared
NOT_COMPARED = ("tracking.", "trainer.resume", "trainer.progress", "trainer.logging_steps", "trainer.save_steps",
                "trainer.keep_last", "trainer.eval_batch_size", "trainer.dist_timeout_s", "trainer.pack_captions",
                "trainer.fused_adamw", "data.num_workers", "data.check_images", "data.cache_images", "data.cache_memory_mb",
                "data.cache_dir", "device.channels_last", "device.compile")


#: keys that say how long the run goes on or how it is watched, not what its steps so far computed: a resume may change
#: them (``clipexp train trainer.resume=<run> trainer.max_steps=2000`` trains longer); the change is logged
MAY_CHANGE = ("trainer.max_steps", "trainer.num_epochs", "trainer.eval_steps", "trainer.early_stopping_patience",
              "trainer.resume_allow_changes")


def config_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every compared key whose values differ. Keys only one of the two
    configs has (the checkpoint predates the key, or the key was since renamed) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    return [(k, old[k], new[k]) for k in sorted(old)
            if k in new and not k.startswith(NOT_COMPARED) and old[k] != new[k]]


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _allowed(key: str, allow: Any) -> bool:
    """``allow``: true (any key), false/null (none), a key or group prefix, or a list of them."""
    if allow is True:
        return True
    names = [allow] if isinstance(allow, str) else list(allow or [])
    return any(key == a or key.startswith(f"{a}.") for a in names)


def check_config(saved: Dict[str, Any], current: Dict[str, Any], allow: Any, path: Path) -> List[Tuple[str, Any, Any]]:
    """The changes ``allow`` covers (logged); raises :class:`CheckpointError` listing the others."""
    changes = config_changes(saved, current)
    _refuse(changes, allow, path)
    if changes:
        log.warning("resume: continuing %s with a changed config: %s", path, describe_changes(changes))
    return changes


def _refuse(changes: Sequence[Tuple[str, Any, Any]], allow: Any, path: Path) -> None:
    refused = [c for c in changes if not (c[0] in MAY_CHANGE or _allowed(c[0], allow))]
    if refused:
        listed = ", ".join(f"{k}: {a} -> {b}" for k, a, b in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise CheckpointError(f"trainer.resume: {path} was trained with a different config ({listed}); resume with the "
                              f"checkpoint's values, or allow the change with trainer.resume_allow_changes=[{keys}] "
                              f"(or =true for any)")


def check_resume_before_start(cfg) -> None:
    """``trainer.resume=<run folder or checkpoint>`` with a change the checkpoint refuses (:func:`check_config`) is
    refused before the job starts: a started job has Hydra rewrite the run folder's ``.hydra/overrides.yaml``, which
    the next ``clipexp train trainer.resume=<run>`` replays, so a refused change would stick to the run. Reads only the
    config of the checkpoint the resume would take (memory-mapped); a file that does not open is left to the resume."""
    resume = cfg.trainer.resume
    if resume in (None, LATEST, LATEST_OR_NEW):
        return
    for path in [Path(resume)] if Path(resume).is_file() else checkpoint_candidates(Path(resume)):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
        except Exception:  # noqa: BLE001 - damaged, foreign or older: the resume itself says what it is
            continue
        _refuse(config_changes(saved or {}, OmegaConf.to_container(cfg, resolve=True)), cfg.trainer.resume_allow_changes, path)
        return


def describe_changes(changes: Sequence[Tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {a} -> {b}" for k, a, b in changes)


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
