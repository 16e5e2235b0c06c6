"""What a run records: its MLflow run (tags, params), its output folder, and the summary table.

* :func:`start_tracking`: the tracker of a run config, its MLflow run started (or, on resume, the
  checkpoint's run continued) with the tags and the flattened config as params. It talks to MLflow
  only through :mod:`clipexp.tracking.tracker`'s interface.
* :func:`write_outputs`: plots, ``metrics.json``, ``config.yaml`` and the ``model/`` folder, each
  logged as an artifact.
* :func:`summary_table`: the baseline / final / best / test table a run prints at the end;
  :func:`summary_markdown` the same as the run's MLflow description (``mlflow.note.content``).
* :func:`default_run_name`: the run's name when ``tracking.run_name`` is null.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import OmegaConf

from clipexp.files import write_folder_manifest, write_text
from clipexp.tracking import plots
from clipexp.tracking.tracker import flatten, git_commit, make_tracker, source_tags, store_lock

log = logging.getLogger(__name__)
SPLIT_CONTEXTS = (("train", "training"), ("val", "validation"), ("test", "test"))


def run_tags(cfg: Any, overrides: List[str], output_dir: Path, *, device: str, precision: str, loss: str,
             extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """The run's tags: source, domain / loss / model / data, the Hydra overrides, where it ran and wrote."""
    return {
        **source_tags(),
        "domain": cfg.domain.name, "loss": loss, "model": cfg.model.name, "data": cfg.data.source,
        "init_from": cfg.model.name_or_path or f"built:{cfg.model.name}",  # a two-stage run names stage 1's folder here
        "git_commit": git_commit(), "hydra_overrides": " ".join(overrides) or "(none)",
        "output_dir": str(output_dir), "device": device, "precision": precision,
        **(extra or {}),
    }


def dataset_source(data_cfg: Any) -> str:
    """Where a run's pairs come from: the file or folder (absolute), the hub id, the shards, or the package folder."""
    if data_cfg.source == "textile" and not data_cfg.path:
        from clipexp.data.textile import textile_root

        return str(textile_root())
    if data_cfg.source == "webdataset":
        return str(data_cfg.urls)
    path = str(data_cfg.path)
    return str(Path(path).absolute()) if data_cfg.source != "hf" or Path(path).exists() else path


def dataset_inputs(cfg: Any, data: Any) -> List[Dict[str, Any]]:
    """The run's splits as MLflow dataset inputs (``Tracker.log_inputs``): one table of its pairs each
    (image path, first caption, label), named ``<data>-<split>``, with the source and the split's context.
    A streamed split (WebDataset) has no table of pairs and is left out."""
    import pandas as pd

    base = Path(str(cfg.data.path)).stem if cfg.data.path else cfg.data.source
    out = []
    for split, context in SPLIT_CONTEXTS:
        pairs = getattr(getattr(data, split, None), "pairs", None)
        if not pairs:
            continue
        table = pd.DataFrame({"image_path": [str(p.image_path) for p in pairs], "caption": [p.captions[0] for p in pairs],
                              "label": [p.label for p in pairs]})
        out.append({"name": f"{base}-{split}", "table": table, "source": dataset_source(cfg.data), "context": context})
    return out


def parent_run_id(output_dir: Path) -> Optional[str]:
    """A sweep's parent run id, written by the sweep callback into the sweep folder."""
    marker = Path(output_dir).parent / "mlflow_parent_run_id"
    return marker.read_text().strip() if marker.is_file() else None


def sweep_keys(output_dir: Path) -> List[str]:
    """The keys a sweep varies, written by the sweep callback into the sweep folder (none outside a sweep)."""
    from clipexp.tracking.sweep import SWEPT_FILE

    marker = Path(output_dir).parent / SWEPT_FILE
    return [k for k in marker.read_text().split(",") if k] if marker.is_file() else []


def default_run_name(cfg: Any, overrides: List[str], swept: Optional[List[str]] = None, loss: Optional[str] = None) -> str:
    """A run's name when ``tracking.run_name`` is null: ``model, loss, domain, data, seed N`` (``tiny, contrastive,
    industrial, textile, seed 0``); a sweep's job is named by its values of the ``swept`` keys
    (``loss.temperature=0.03, seed=1``), beside its siblings under the sweep's parent run."""
    from clipexp.tracking.sweep import override_values

    given = override_values(" ".join(overrides))
    values = [f"{k}={given[k]}" for k in swept or () if k in given]
    if values:
        return ", ".join(values)[:250]
    data = Path(str(cfg.data.path)).stem if cfg.data.get("path") else cfg.data.source
    if loss is None:  # the loss option's name, from the class its file names
        from clipexp.config.validate import component_class

        loss = component_class(cfg, "loss").name
    return f"{cfg.model.name}, {loss}, {cfg.domain.name}, {data}, seed {cfg.seed}"[:250]


def set_experiment_view(tracker: Any, monitor: str, mode: str) -> None:
    """The experiment's saved runs-table view on ``monitor`` (:func:`clipexp.tracking.ui.set_runs_view`); a
    store that refuses it (read-only, an older server) costs one warning."""
    from clipexp.tracking.ui import set_runs_view

    try:
        with store_lock(tracker.uri):
            set_runs_view(tracker.client, tracker.experiment_id, monitor, mode)
    except Exception as err:  # noqa: BLE001 - a convenience of the UI; never fail a run for it
        log.warning("tracking: the experiment's runs view could not be saved: %s", str(err).splitlines()[0] if str(err) else err)


def start_tracking(cfg: Any, *, enabled: bool, overrides: List[str], output_dir: Path, tags: Dict[str, str], derived: Dict[str, Any],
                   resume: Optional[Dict[str, Any]] = None, data: Any = None):
    """A started tracker. ``resume``: ``{"run_id", "from", "step"}`` of the checkpoint resumed, whose
    MLflow run is continued (tagged with where it resumed); otherwise a new run with ``tags``, the
    flattened resolved config and the ``derived`` values (``derived.<name>``) as params, and the splits of
    ``data`` (the trainer's datasets) as its dataset inputs."""
    tc = cfg.tracking
    tracker = make_tracker(enabled, tc.uri, tc.experiment, output_dir, tc.retry_s, tc.end_timeout_s)
    if resume is not None and resume.get("run_id") and tracker.enabled:
        tracker.start(run_id=resume["run_id"], system_metrics=tc.system_metrics)
        tracker.set_tags({"resumed_from": str(resume["from"]), "resumed_at_step": resume["step"],
                          **({"resume_changes": resume["changes"]} if resume.get("changes") else {})})
        return tracker
    tracker.start(run_name=tc.run_name or default_run_name(cfg, overrides, sweep_keys(output_dir), tags.get("loss")), tags=tags,
                  parent_run_id=parent_run_id(output_dir), system_metrics=tc.system_metrics)
    if tracker.enabled:
        set_experiment_view(tracker, cfg.trainer.monitor, cfg.trainer.monitor_mode)
    tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    tracker.log_params({f"derived.{k}": v for k, v in derived.items()})
    if data is not None and tracker.enabled:
        try:
            tracker.log_inputs(dataset_inputs(cfg, data))
        except Exception as err:  # noqa: BLE001 - the Dataset column is a convenience; never fail a run for it
            log.warning("tracking: the datasets could not be logged as run inputs: %s", err)
    return tracker


def write_plots(plot_dir: Path, result: Optional[Dict[str, Any]], dataset, split: Optional[str], class_names, history,
                monitor: Optional[str] = None, best_step: Optional[int] = None) -> None:
    """Similarity heatmap and zero-shot confusion of the last evaluation (``result``, with its ``embeddings``),
    training curves (``monitor`` and ``best_step`` default to what ``history`` says: :func:`plots.monitored`)."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    if result is not None:
        if result.get("embeddings") is not None:
            plots.similarity_heatmap(result["embeddings"], list(dataset.captions), list(class_names or []),
                                     plot_dir / "similarity_heatmap.png", split=split)
        if result["confusion"] is not None:
            plots.confusion_matrix(result["confusion"], list(class_names), plot_dir / "zeroshot_confusion.png",
                                   title=f"zero-shot confusion ({split})")
    plots.training_curves(history, plot_dir / "training_curves.png", monitor, best_step)


def write_outputs(output_dir: Path, cfg: Any, summary: Dict[str, Any], model, processor, tracker, hydra_dir: Optional[Path],
                  publish: Optional[Callable[[Path], None]] = None) -> None:
    """``metrics.json`` (``summary``, plus ``mlflow``: the run's page, id and store when tracked), ``config.yaml``
    (resolved), ``model/`` (save_pretrained, with its sha256 manifest ``SHA256SUMS``), and the
    artifacts: those, ``.hydra/`` and ``plots/`` (written before). ``publish(model_dir)`` runs once
    ``model/`` is saved and before it is logged (the serving spec and the pyfunc model). The run's
    description (``mlflow.note.content``) becomes :func:`summary_markdown` of ``summary``."""
    if tracker.enabled:
        summary = {**summary, "mlflow": {"run_page": tracker.run_page_url, "run_id": tracker.run_id,
                                         "experiment_id": tracker.experiment_id, "tracking_uri": tracker.uri}}
        tracker.set_tags({NOTE_TAG: summary_markdown(summary, summary.get("best_step"), summary.get("monitor"))})
    metrics_path = output_dir / "metrics.json"
    write_text(metrics_path, json.dumps(summary, indent=2))
    config_path = output_dir / "config.yaml"
    OmegaConf.save(cfg, config_path, resolve=True)
    model_dir = output_dir / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    if publish is not None:
        publish(model_dir)  # (it writes the folder's SHA256SUMS once the spec is in)
    else:
        write_folder_manifest(model_dir)

    tracker.log_artifact(config_path)
    tracker.log_artifact(metrics_path)
    if hydra_dir is not None and hydra_dir.is_dir():
        tracker.log_artifacts(hydra_dir, "hydra")
    tracker.log_artifacts(output_dir / "plots", "plots")
    if cfg.tracking.log_model:
        tracker.log_artifacts(model_dir, "model")


NOTE_TAG = "mlflow.note.content"  # a run's (or LoggedModel's) description in MLflow's UI, Markdown
SUMMARY_COLUMNS = (("baseline", "baseline", "val"), ("final", "final", "val"), ("best", "best", "val"), ("test", "test", "test"))
SUMMARY_ROWS = ("loss", "i2t_R1", "i2t_R5", "t2i_R1", "t2i_R5", "zeroshot_acc", "zeroshot_balanced_acc")


def _summary_values(results: Dict[str, Any]) -> List[tuple]:
    """``(metric, [baseline, final, best, test])`` for the rows that have a value."""
    rows = []
    for r in SUMMARY_ROWS:
        vals = [(results.get(key) or {}).get(f"{split}/{r}") for _, key, split in SUMMARY_COLUMNS]
        if any(v is not None for v in vals):
            rows.append((r, vals))
    return rows


def _summary_legend(best_step: Optional[int]) -> str:
    at = f" (step {best_step})" if best_step is not None else ""
    return (f"baseline = validation at step 0, final = at the last step, best = at the best step{at}; "
            f"test = test split with the best checkpoint")


def summary_table(results: Dict[str, Dict[str, float]], best_step: Optional[int] = None) -> str:
    """Baseline, final and best validation metrics and the test metrics, for the metrics users read first."""
    lines = [f"{'metric':<24}" + "".join(f"{title:>10}" for title, _, _ in SUMMARY_COLUMNS)]
    for r, vals in _summary_values(results):
        lines.append(f"{r:<24}" + "".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in vals))
    lines.append(_summary_legend(best_step))
    return "\n".join(lines)


def heads_table(heads: Dict[str, float], alpha: float) -> Optional[str]:
    """The heads' test figures a run prints after its summary table (None without test figures)."""
    from clipexp.names import HEADS

    names = [h for h in HEADS if f"test/{h}/balanced_acc" in heads]
    if not names:
        return None
    cols = [("balanced_acc", "balanced_acc"), ("acc", "acc"), ("ece_uncalibrated", "ece_raw"), ("ece", "ece"),
            ("coverage", "coverage"), ("set_size", "set_size")]
    lines = [f"{'head (test)':<24}" + "".join(f"{title:>13}" for _, title in cols)]
    for h in names:
        vals = [heads.get(f"test/{h}/{key}") for key, _ in cols]
        lines.append(f"{h:<24}" + "".join(f"{v:>13.4f}" if v is not None else f"{'-':>13}" for v in vals))
    lines.append(f"heads fitted on the training split's embeddings; ece_raw before and ece after temperature scaling on val; "
                 f"coverage and set size of the prediction sets at alpha {alpha:g}")
    return "\n".join(lines)


def wise_ft_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """Flat MLflow metrics: ``wise_ft/alpha_0.50/val/zeroshot_balanced_acc``, ..., ``wise_ft/selected_alpha``."""
    out = {f"wise_ft/{key}/{name}": value for key, metrics in result["alphas"].items() for name, value in metrics.items()}
    out["wise_ft/selected_alpha"] = result["selected"]
    return out


def wise_ft_table(result: Dict[str, Any], target: str = "val", retention: Optional[str] = None,
                  metric: str = "zeroshot_balanced_acc") -> str:
    """The printed WiSE-FT table: alpha, target metric, retention metric."""
    from clipexp.finetune.wise_ft import alpha_key

    cols = [target] + ([retention] if retention else [])
    lines = [f"{'wise_ft alpha':<16}" + "".join(f"{c + '/' + metric:>34}" for c in cols)]
    for key, metrics in result["alphas"].items():
        mark = " *" if key == alpha_key(result["selected"]) else ""
        lines.append(f"{key[len('alpha_'):]:<16}" + "".join(f"{metrics.get(f'{c}/{metric}', float('nan')):>34.4f}" for c in cols) + mark)
    lines.append("* = the selected alpha: the saved model and the test column (0 = the start model, 1 = the fine-tuned one)")
    return "\n".join(lines)


def summary_markdown(results: Dict[str, Any], best_step: Optional[int] = None, monitor: Optional[str] = None) -> str:
    """:func:`summary_table` as a Markdown table: the run's description in MLflow (``mlflow.note.content``)."""
    head = f"Monitored: `{monitor}`" + (f", best at step {best_step}" if best_step is not None else "") + ".\n\n" if monitor else ""
    lines = ["| metric | " + " | ".join(title for title, _, _ in SUMMARY_COLUMNS) + " |", "|---|" + "---:|" * len(SUMMARY_COLUMNS)]
    for r, vals in _summary_values(results):
        lines.append(f"| {r} | " + " | ".join(f"{v:.4f}" if v is not None else "-" for v in vals) + " |")
    return head + "\n".join(lines) + "\n\n" + _summary_legend(best_step) + "\n"
