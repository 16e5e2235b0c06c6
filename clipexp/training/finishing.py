"""The end of a run on rank 0, and ``clipexp export``: plots, ``metrics.json``, ``config.yaml``, ``model/``, the MLflow model.

:func:`write_run_outputs` takes plain data (:class:`RunOutputs`) and the objects it saves (model, processor, loss,
tracker), never the trainer. When a write fails there (a full disk, a quota, a read-only folder: anywhere in the
error's chain, in a plot, ``metrics.json``, ``model/`` or the LoggedModel), it keeps what matters and says how to
finish: the checkpoints are not touched (``best.pt`` holds the weights the outputs are made of, the last step
checkpoint the config and the results), the MLflow run is kept and tagged ``failure`` (the task then marks it
FAILED), and a :class:`~clipexp.errors.WriteError` says in one line what could not be written, what is kept, and
the command that writes the outputs from the checkpoints once it can: ``clipexp export <run folder>``
(:func:`clipexp.training.task.export`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from clipexp.errors import WriteError
from clipexp.files import describe_os_error, write_error
from clipexp.heads import HEADS_FILE
from clipexp.serving.logged_model import publish_model
from clipexp.tracking import plots
from clipexp.tracking.heads_plots import heads_figures
from clipexp.tracking.outputs import write_outputs, write_plots


@dataclass
class RunOutputs:
    """What the end of a run writes, as plain data."""

    output_dir: Path
    cfg: Any                                # the resolved run config (written as config.yaml)
    hydra_dir: Optional[Path]               # Hydra's .hydra/ folder, logged beside the config
    results: Dict[str, Any]                 # baseline / final / best / test (/ wise_ft) metrics
    history: Dict[str, List[tuple]]         # every logged metric as (step, value)
    best_value: Optional[float]
    best_step: Optional[int]
    steps: int                              # optimizer steps taken
    tested_step: int                        # the step of the weights tested and saved (the best checkpoint's)
    result: Optional[Dict[str, Any]]        # the last evaluation with the best weights (metrics, confusion, embeddings)
    split: Optional[str]                    # its split: test, or val without a test split
    dataset: Any                            # that split's dataset (captions for the heatmap)
    class_names: List[str]
    wise: Optional[Dict[str, Any]]          # WiSE-FT's alphas and selection, when it ran
    retention: Optional[str]                # the eval_data set's name, when there is one
    eval_batch_size: int
    test_pairs: Optional[Sequence[Any]]
    best_checkpoint: Path
    last_checkpoint: Optional[Path]
    heads: Any = None                       # the heads' HeadsReport (clipexp.heads), when the run fitted them


def export_command(output_dir: Path) -> str:
    return f"clipexp export {output_dir}"


def write_run_outputs(run: RunOutputs, model: Any, processor: Any, loss_fn: Any, tracker: Any) -> None:
    """Plots of ``run.result``, the WiSE-FT plot and the heads' figures, then
    :func:`~clipexp.tracking.outputs.write_outputs` with the fitted heads (``model/heads.pt``), the serving spec and the
    pyfunc model; raises :class:`WriteError` when a write fails."""
    out, cfg = Path(run.output_dir), run.cfg
    try:
        write_plots(out / "plots", run.result, run.dataset, run.split, run.class_names, run.history)
        if run.wise is not None:
            metric = str(cfg.trainer.monitor).rsplit("/", 1)[-1]
            points = list(run.wise["alphas"].values())
            retention = [m.get(f"{run.retention}/{metric}") for m in points] if run.retention else None
            plots.wise_ft_curve([float(a) for a in cfg.trainer.wise_ft.alphas], [m.get(f"val/{metric}") for m in points], retention,
                                out / "plots" / "wise_ft.png", retention_name=run.retention or "retention", metric=metric)
        if run.heads is not None:
            heads_figures(run.heads, out / "plots")
        summary = {**run.results, "monitor": cfg.trainer.monitor, "best_value": run.best_value, "best_step": run.best_step,
                   "steps": run.steps}

        def publish(model_dir: Path) -> None:  # heads.pt, clipexp_inference.json, SHA256SUMS, test_split.csv, the pyfunc model
            if run.heads is not None:
                run.heads.save_heads(model_dir / HEADS_FILE)
            publish_model(tracker, model_dir, cfg, class_names=run.class_names, loss_fn=loss_fn, model=model, step=run.tested_step,
                          best_value=run.best_value, eval_batch_size=run.eval_batch_size, test_pairs=run.test_pairs)

        write_outputs(out, cfg, summary, model, processor, tracker, run.hydra_dir, publish=publish)
    except Exception as err:  # noqa: BLE001 - re-raised unless a write failed
        failed = write_error(err)
        if failed is None:
            raise
        line = _write_failure_line(run, failed, tracker)
        tracker.set_tags({"failure": line})
        raise WriteError(line) from None


def _write_failure_line(run: RunOutputs, err: OSError, tracker: Any) -> str:
    out = Path(run.output_dir)
    what = f"{err.filename}: " if err.filename else ""
    kept = [str(run.best_checkpoint) if Path(run.best_checkpoint).is_file() else None,
            str(run.last_checkpoint) if run.last_checkpoint else None]
    mlflow_run = f" and the MLflow run {tracker.run_id}" if getattr(tracker, "enabled", False) else ""
    return (f"could not write the run's outputs ({what}{describe_os_error(err)}); the checkpoints "
            f"{' and '.join(k for k in kept if k)}{mlflow_run} are kept: free space in {out} (or make it writable), then write "
            f"the outputs from the checkpoints with `{export_command(out)}`")
