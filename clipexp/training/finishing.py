"""The end of a run on rank 0: plots, ``metrics.json``, ``config.yaml``, ``model/`` and the MLflow model; a full disk there.

:func:`write_run_outputs` is the last part of :meth:`clipexp.training.trainer.Trainer.finish`. When the disk fills
while it writes (``ENOSPC`` or ``EDQUOT`` anywhere in the error's chain: a plot, ``metrics.json``, ``model/``, or the
LoggedModel, whose other failures are only reported), it keeps what matters and says how to finish:

* the checkpoints are not touched (``best.pt``, the weights the outputs are made of, and the last step checkpoint,
  which holds the config and the results);
* the MLflow run is kept and tagged ``failure`` with the reason (the trainer's cleanup then marks it FAILED);
* :class:`ExportWriteError` says, in one line, what could not be written, what is kept, and the command that
  writes the outputs from the checkpoints once there is space: ``python -m clipexp.training.export <run folder>``
  (:mod:`clipexp.training.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from clipexp.paths import disk_full_error
from clipexp.serving.logged_model import publish_model
from clipexp.tracking.outputs import write_outputs, write_plots
from clipexp.training.checkpoint import BEST


class ExportWriteError(RuntimeError):
    """The outputs at the end of a run could not be written (a full disk): one line with the command that finishes them."""


def export_command(output_dir: Path) -> str:
    return f"python -m clipexp.training.export {output_dir}"


def write_run_outputs(trainer: Any, result: Optional[Dict[str, Any]], split: Optional[str], wise: Optional[Dict[str, Any]]) -> None:
    """Plots of ``result`` (the ``split`` evaluation with the best weights), the WiSE-FT plot, then
    :func:`~clipexp.tracking.outputs.write_outputs` with the serving spec and the pyfunc model; raises
    :class:`ExportWriteError` when the disk fills."""
    t = trainer
    out = Path(t.output_dir)
    try:
        write_plots(out / "plots", result, getattr(t.data, split) if split else None, split, t.data.class_names, t.history)
        if wise is not None:
            t.robust.plot_wise_ft(wise, out / "plots" / "wise_ft.png", t.extra_eval[0] if t.extra_eval else None)
        summary = {**t.results, "monitor": t.cfg.trainer.monitor, "best_value": t.best_value, "best_step": t.best_step, "steps": t.step}

        def publish(model_dir: Path) -> None:  # clipexp_inference.json, SHA256SUMS, test_split.csv, the pyfunc model
            publish_model(t.tracker, model_dir, t.cfg, class_names=t.data.class_names, loss_fn=t.loss_fn, model=t.model,
                          step=t.step, best_value=t.best_value, eval_batch_size=t.eval_batch_size,
                          test_pairs=getattr(t.data.test, "pairs", None))

        write_outputs(out, t.cfg, summary, t.model, t.processor, t.tracker, t.hydra_dir, publish=publish)
    except Exception as err:
        full = disk_full_error(err)
        if full is None:
            raise
        line = disk_full_line(t, full)
        t.tracker.set_tags({"failure": line})
        raise ExportWriteError(line) from None


def disk_full_line(trainer: Any, err: OSError) -> str:
    out, best = Path(trainer.output_dir), Path(trainer.ckpt_dir) / BEST
    what = f"{err.filename}: " if err.filename else ""
    kept = [str(best) if best.is_file() else None, str(trainer.last_checkpoint) if trainer.last_checkpoint else None]
    run = f" and the MLflow run {trainer.tracker.run_id}" if getattr(trainer.tracker, "enabled", False) else ""
    return (f"the disk filled while writing the run's outputs ({what}{err.strerror or err}); the checkpoints "
            f"{' and '.join(k for k in kept if k)}{run} are kept: free space in {out}, then write the outputs from the "
            f"checkpoints with `{export_command(out)}`")
