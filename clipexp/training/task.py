"""The Hydra task: one job from a composed config to an exit code (or, in a sweep, a returned value).

``run(cfg)`` builds a :class:`clipexp.training.trainer.Trainer`, trains, prints the summary table, and turns
what can go wrong into what a user reads: one line and exit code 2 for a user error (1 for a
non-finite loss or a disk that filled while the outputs were written, with the command that finishes
them; 130 for Ctrl-C / SIGTERM after a checkpoint), NaN and a FAILED run for a failing
job of a sweep, and under torchrun one line naming the rank that failed (:func:`_stop_rank`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig

from clipexp.errors import ConfigError, UserError
from clipexp.tracking.outputs import heads_table, summary_table, wise_ft_table
from clipexp.training import distributed
from clipexp.training.finishing import export_command
from clipexp.training.trainer import Trainer

log = logging.getLogger(__name__)

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def run(cfg: DictConfig) -> Optional[float]:
    """Train one job; return the best value of ``trainer.monitor`` (what an Optuna sweep optimises).

    A single run ends a user error with one line and exit code 2 (1 for a non-finite loss). In a sweep a
    failing job is recorded (its MLflow run FAILED, the error in its log) and returns NaN, so the other
    jobs go on and the sweep summary lists it. Under torchrun any failure ends the process (see
    :func:`_stop_rank`): the ranks cannot be trusted to agree on the next collective.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if distributed.env_world_size() > 1 and int(os.environ.get("RANK", "0")) > 0:
        _quiet_this_rank()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    output_dir = Path(hc.runtime.output_dir)
    hydra_dir = output_dir / hc.output_subdir if hc.output_subdir else None
    tags = {"job_num": hc.job.num, "sweep_dir": str(Path(hc.sweep.dir).resolve())} if multirun else {}
    trainer = Trainer(cfg, output_dir, list(hc.overrides.task), hydra_dir, tags=tags)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        trainer.setup()
        results = trainer.train()
    except KeyboardInterrupt:
        if trainer.dist.enabled:
            _stop_rank(trainer, None)
        trainer.cleanup("KILLED")
        print(interrupted_line(trainer), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        if trainer.dist.enabled:
            _stop_rank(trainer, err)
        trainer.cleanup("FAILED")
        expected = isinstance(err, UserError)
        if multirun:
            log.error("job %s failed: %s", hc.job.num, err, exc_info=not expected)
            print(f"clipexp: job {hc.job.num} failed: {err}", file=sys.stderr)
            return float("nan")
        if expected:
            if trainer.tracker is None:  # stopped while setting up (bad data, a file that is not there): nothing to keep
                remove_untouched_folder(output_dir, f"{hc.job.name}.log")
            print(f"clipexp: error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        raise
    except BaseException:
        trainer.cleanup("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    trainer.cleanup("FINISHED")
    if trainer.dist.is_main:
        print(summary_table(results, trainer.best_step))
        heads = heads_table(results.get("heads", {}), cfg.eval.conformal.alpha)
        if heads:
            print(heads)
        if "wise_ft" in results:
            retention = trainer.extra_eval[0] if trainer.extra_eval else None
            print(wise_ft_table(results["wise_ft"], "val", retention, str(cfg.trainer.monitor).rsplit("/", 1)[-1]))
        print(f"outputs: {output_dir}\nmodel:   {output_dir / 'model'}\nmetrics: {output_dir / 'metrics.json'}\nmlflow:  {trainer.tracker.run_url}")
    return trainer.best_value


def remove_untouched_folder(output_dir: Path, job_log: str) -> None:
    """Remove the run folder Hydra made when it holds only Hydra's own files (``.hydra/``, the job log), and the folders
    above it inside the current one that this leaves empty (``outputs/<date>``): a run that failed validation leaves
    nothing behind. A folder with anything else in it (a resumed run's checkpoints) is kept."""
    import shutil

    if not output_dir.is_dir() or not {p.name for p in output_dir.iterdir()} <= {".hydra", job_log}:
        return
    shutil.rmtree(output_dir, ignore_errors=True)
    here = Path.cwd().resolve()
    for parent in output_dir.resolve().parents:
        if parent == here or here not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupted_line(trainer: Trainer) -> str:
    """What an interrupted run prints: where it stopped and the command that continues it."""
    if trainer.last_checkpoint is None:
        return f"clipexp: interrupted at step {trainer.global_step}, before the first checkpoint: nothing to resume"
    return (f"clipexp: interrupted at step {trainer.global_step}; checkpoint: {trainer.last_checkpoint}; continue with "
            f"`clipexp train trainer.resume={trainer.output_dir}`")


def _quiet_this_rank() -> None:
    """Ranks > 0 log errors only, to stderr, and leave warnings to rank 0 (torchrun ranks get their
    logging from ``__main__``'s Hydra overrides; the tasks of a submitit job get it here)."""
    import warnings

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def _stop_rank(trainer: "Trainer", err: Optional[BaseException]) -> None:
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
    ctx, step = trainer.dist, trainer.global_step + 1
    own_failure = err is not None and not distributed.is_collective_error(err)
    if own_failure:
        expected = isinstance(err, UserError)
        what = str(err) if expected else f"{type(err).__name__}: {_first_line(err)}"
        ctx.report("failed", f"rank {ctx.rank} failed at step {step}: {what}")
        status, show = "FAILED", ctx.is_main or not expected
        code = err.exit_code if expected else EXIT_FAILED
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
        line = interrupted_line(trainer)
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


def export(run_dir: Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """``clipexp export <run folder> [key=value ...]``: write a finished run's outputs from its checkpoints.

    The config and the loop position come from the run folder's newest readable step checkpoint (the last step's:
    it holds the resolved config, the history and the results), the weights from ``best.pt``; the trainer is rebuilt
    as the run had it and resumed at its last step, so nothing is trained: the test evaluation with the best weights
    (and WiSE-FT, when the run used it), the plots, ``metrics.json``, ``config.yaml``, ``model/`` and the MLflow model
    are written, and the MLflow run is marked FINISHED (tagged ``exported_by``). ``key=value`` overrides apply on top
    of the checkpoint's config (``tracking.uri=...`` for a store that moved); keys that change what was computed are
    refused as a resume would refuse them. Returns the run's results."""
    from omegaconf import OmegaConf

    from clipexp.config.schema import RunConfig
    from clipexp.training.checkpoint import checkpoint_candidates, pick_checkpoint

    run_dir = Path(run_dir).expanduser().resolve()
    if not checkpoint_candidates(run_dir):
        raise ConfigError("run folder", str(run_dir), f"a run folder with step checkpoints (there is no checkpoint in "
                                                      f"{run_dir / 'checkpoints'}): the export writes a run's outputs from them")
    path, state = pick_checkpoint(str(run_dir), run_dir, "cpu")  # the newest readable step checkpoint, or one line
    if not state.get("config"):
        raise ConfigError("run folder", str(run_dir), f"a run folder whose checkpoints hold their config ({path} has none)")
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), state["config"], OmegaConf.from_dotlist(list(overrides)))
    cfg.trainer.resume = str(run_dir)
    hydra_dir = run_dir / ".hydra"
    trainer = Trainer(cfg, run_dir, hydra_dir=hydra_dir if hydra_dir.is_dir() else None)
    try:
        trainer.setup()
        if trainer.global_step < trainer.plan.total_steps:
            raise ConfigError("run folder", str(run_dir), f"a run that finished training ({path} is step {trainer.global_step} of "
                                                          f"{trainer.plan.total_steps}); resume it with `clipexp train "
                                                          f"trainer.resume={run_dir}`")
        results = trainer.train()  # at the last step: only the end of the run (finish) runs
        trainer.tracker.set_tags({"exported_by": export_command(run_dir)})
        return results
    finally:
        trainer.cleanup()
