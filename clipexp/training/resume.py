"""What ``trainer.resume=latest|<path>`` resumes from, and whether it may.

* :func:`resume_checkpoint`: the checkpoint and its state. ``latest`` is the newest readable
  ``step_*.pt`` (a truncated or corrupt newer one is named in one warning and skipped, never a silent
  fresh start); an explicit path must be readable (else one line naming the newest good one beside it).
* :func:`check_config`: the checkpoint's config against this run's. Keys that change what is computed
  (loss, batch, data, optimiser, model, ...) must match unless ``trainer.resume_allow_changes`` allows
  them (``true``, or a list of keys or group prefixes such as ``[loss,trainer.batch_size]``); keys that
  only say where the run logs or how fast it goes (:data:`NOT_COMPARED`) are never compared.

Plain functions of paths and dicts (no Hydra, no MLflow).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from omegaconf import OmegaConf

from clipexp.errors import ConfigError
from clipexp.training.checkpoint import STEP_GLOB, CheckpointError, DamagedCheckpoint, checkpoint_candidates, load_checkpoint

log = logging.getLogger(__name__)


def pick_checkpoint(resume: str, output_dir: Path, map_location=None) -> Tuple[Path, Dict[str, Any]]:
    """``trainer.resume`` -> (path, state): ``latest`` skips damaged files (one warning each, naming the
    one taken instead); an explicit path must itself be readable."""
    explicit = resume != "latest"
    paths = [Path(resume)] if explicit else checkpoint_candidates(output_dir)
    if not paths or not paths[0].is_file():
        raise ConfigError("trainer.resume", resume, "latest (with a checkpoint under outputs/) or a checkpoint file path")
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
    raise CheckpointError(f"trainer.resume=latest: no readable checkpoint: {', '.join(str(d.path) for d in damaged)} are all "
                          f"truncated or corrupt; start without trainer.resume, or point it at a good copy")


def resume_checkpoint(cfg, output_dir: Path, dist, map_location=None) -> Tuple[Path, Dict[str, Any], List[Tuple[str, Any, Any]]]:
    """What ``trainer.resume=latest|<path>`` resumes from: (path, state, the allowed (key, old, new) changes).

    Rank 0 picks the file (skipping damaged ones, see :func:`pick_checkpoint`) and sends its path
    to the others, which must be able to read the same file (outputs on a filesystem every node
    shares). The checkpoint's config must match this run's (:func:`config_changes`) unless the user
    allows the difference with ``trainer.resume_allow_changes``.
    """
    resume = cfg.trainer.resume
    path, state, refusal = None, None, None
    if dist.is_main:
        try:
            path, state = pick_checkpoint(resume, output_dir, map_location)
        except ConfigError as err:
            refusal = err
    path, message = dist.broadcast((path, None if refusal is None else str(refusal)))  # every rank stops alike
    if refusal is not None:
        raise refusal
    if message is not None:
        raise CheckpointError(message)
    if state is None:
        if not Path(path).is_file():
            raise ConfigError("trainer.resume", resume, f"a checkpoint every rank can read; rank 0 found {path} but rank "
                              f"{dist.rank} cannot: put the outputs on a filesystem every node shares")
        state = load_checkpoint(path, map_location)
    changed = check_config(state.get("config") or {}, OmegaConf.to_container(cfg, resolve=True), cfg.trainer.resume_allow_changes, path)
    return path, state, changed


# --------------------------------------------------------------------------------------------------
# Resuming with a changed config
# --------------------------------------------------------------------------------------------------

#: keys that say where a run logs or how fast it goes, not what it computes: never compared
NOT_COMPARED = ("tracking.", "trainer.resume", "trainer.progress", "trainer.logging_steps", "trainer.save_steps",
                "trainer.keep_last", "trainer.eval_batch_size", "trainer.dist_timeout_s", "trainer.pack_captions",
                "trainer.fused_adamw", "data.num_workers", "data.check_images", "data.cache_images", "data.cache_memory_mb",
                "data.cache_dir", "device.channels_last", "device.compile")


def config_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every compared key whose values differ. Keys the
    checkpoint's config lacks (it predates them) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    return [(k, old[k], new.get(k)) for k in sorted(old)
            if not k.startswith(NOT_COMPARED) and old[k] != new.get(k)]


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
    refused = [c for c in changes if not _allowed(c[0], allow)]
    if refused:
        listed = ", ".join(f"{k}: {a} -> {b}" for k, a, b in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise CheckpointError(f"trainer.resume: {path} was trained with a different config ({listed}); resume with the "
                              f"checkpoint's values, or allow the change with trainer.resume_allow_changes=[{keys}] "
                              f"(or =true for any)")
    if changes:
        log.warning("resume: continuing %s with a changed config: %s", path, describe_changes(changes))
    return changes


def describe_changes(changes: Sequence[Tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {a} -> {b}" for k, a, b in changes)
