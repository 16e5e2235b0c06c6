"""Sweeps in MLflow: one parent run per ``-m`` sweep, each job a child, and a summary at the end.

``MLflowSweepCallback`` is a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``):

* ``on_multirun_start`` creates the parent run (tags: sweep id, the sweep command, the swept keys) and
  writes its id to ``<sweep dir>/mlflow_parent_run_id`` and the swept keys to ``mlflow_swept_keys``; each job's
  trainer reads them and opens its run as a child named by its swept values (so it works with the basic,
  joblib and submitit launchers alike).
* ``on_multirun_end`` (and, for robustness, every ``on_job_end`` in the main process) writes the summary:
  a table (one row per job: swept values, monitored metric, baseline, final, test, status) as CSV and
  Markdown, the mean and std over seeds of each setting (jobs grouped by their swept values other than
  ``seed``: ``sweep_summary_by_setting.csv``, and in the Markdown), the best job's run id and value as
  tags and a metric, and a plot of the monitored metric against each swept numeric key.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run_id"
SWEPT_FILE = "mlflow_swept_keys"  # the swept keys, comma-separated: each job names its run by its values of them


def swept_keys(config: DictConfig) -> List[str]:
    """Keys that take several values in this sweep (command-line sweeps and sweeper search spaces)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: List[str] = []
    try:
        overrides = list(config.hydra.overrides.task)
        for ov in OverridesParser.create().parse_overrides(overrides):
            if ov.is_sweep_override():
                keys.append(ov.get_key_element().lstrip("+~"))
    except Exception:  # noqa: BLE001 - an unusual override never breaks the sweep
        pass
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if params:
        keys += [k for k in params.keys() if k not in keys]
    return keys


class MLflowSweepCallback(Callback):
    """Parent/child MLflow runs for multirun sweeps (see module docstring)."""

    def __init__(self) -> None:
        self.parent_run_id: Optional[str] = None
        self.tracker = None

    def __getstate__(self) -> Dict[str, Any]:
        """A process launcher (joblib) sends this callback to its job processes: without the tracker (its
        sender thread stays in the main process, which writes the summary at the end)."""
        return {**self.__dict__, "tracker": None}

    # Hydra calls these by name (hydra.experimental.callback.Callback protocol)
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not OmegaConf.select(config, "tracking.enabled", default=False):
            return
        from clipexp.tracking.tracker import Tracker, source_tags

        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tc = config.tracking
        self.tracker = Tracker(tc.uri, tc.experiment, sweep_dir, tc.retry_s, tc.end_timeout_s)  # held writes spool to the sweep dir
        keys = swept_keys(config)
        sweep_id = "/".join(sweep_dir.parts[-2:])
        self.tracker.start(
            run_name=f"sweep {sweep_id}",
            tags={
                **source_tags("clipexp train -m"),
                "sweep_id": sweep_id,
                "sweep_command": "python -m clipexp " + " ".join(sys.argv[1:]),
                "swept_keys": ",".join(keys),
                "sweep_dir": str(sweep_dir.resolve()),
                "role": "sweep_parent",
            },
        )
        self.parent_run_id = self.tracker.run_id
        (sweep_dir / PARENT_FILE).write_text(self.parent_run_id)
        (sweep_dir / SWEPT_FILE).write_text(",".join(keys))
        log.info("MLflow sweep parent run %s (experiment %s)", self.parent_run_id, config.tracking.experiment)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None:  # main-process launchers: keep the summary current after every job
            self._summarise(config, final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.tracker is None:
            return
        rows = self._summarise(config, final=True)
        failed = [r for r in rows if r["status"] != "FINISHED"]
        self.tracker.end("FAILED" if rows and len(failed) == len(rows) else "FINISHED")
        print(f"sweep: {len(rows)} jobs, {len(failed)} not finished; parent run {self.parent_run_id} in {self.tracker.uri}")

    # ------------------------------------------------------------------------------------------------
    def _summarise(self, config: DictConfig, final: bool) -> List[Dict[str, Any]]:
        try:
            return write_summary(self.tracker, config, swept_keys(config), final=final)
        except Exception as err:  # noqa: BLE001 - a summary problem must not fail the sweep
            log.warning("could not write the sweep summary: %s", err)
            return []


def child_rows(client, experiment_id: str, parent_run_id: str, keys: List[str], monitor: str) -> List[Dict[str, Any]]:
    """One dict per child run: job, swept values, monitored metric (best), baseline, final, test, status."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000)
    metric = monitor.split("/", 1)[1] if "/" in monitor else monitor
    rows = []
    for run in runs:
        m, p, tags = run.data.metrics, run.data.params, run.data.tags
        history = client.get_metric_history(run.info.run_id, monitor) if monitor in m else []
        baseline = next((h.value for h in sorted(history, key=lambda h: h.step) if h.step == 0), None)
        row: Dict[str, Any] = {
            "job": int(tags.get("job_num", -1)),
            "run_id": run.info.run_id,
            "status": run.info.status,
            "overrides": tags.get("hydra_overrides", ""),
        }
        given = override_values(row["overrides"])
        for k in keys:  # a config group (loss=siglip) is no param: its value is the job's override
            row[k] = p.get(k, given.get(k))
        row.update({
            f"best {monitor}": m.get(f"best/{monitor}"),
            f"baseline {monitor}": baseline,
            f"final {monitor}": m.get(monitor),
            f"test/{metric}": m.get(f"test/{metric}"),
        })
        rows.append(row)
    return sorted(rows, key=lambda r: r["job"])


def override_values(overrides: str) -> Dict[str, str]:
    """``{key: value}`` of a job's ``hydra_overrides`` tag (space-separated ``key=value``)."""
    pairs = (o.split("=", 1) for o in overrides.split() if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs}


def setting_summary(table, keys: List[str], monitor: str):
    """Mean and std (n - 1) over seeds per setting: finished jobs grouped by their swept values but ``seed``.

    One row per setting: its values, ``seeds`` (finished jobs with a value), ``failed`` (other jobs), and
    ``mean`` / ``std`` of the best monitored value and of its test value (std empty for one seed).
    """
    import pandas as pd

    metric = monitor.split("/", 1)[1] if "/" in monitor else monitor
    values = [f"best {monitor}", f"test/{metric}"]
    by = [k for k in keys if k != "seed"]
    table = table.assign(_ok=(table["status"] == "FINISHED") & table[values[0]].notna())
    groups = table.groupby(by, dropna=False, sort=False) if by else [((), table)]
    rows = []
    for setting, jobs in groups:
        setting = setting if isinstance(setting, tuple) else (setting,)
        done = jobs[jobs["_ok"]]
        row: Dict[str, Any] = dict(zip(by, setting))
        row.update({"seeds": len(done), "failed": int((~jobs["_ok"]).sum())})
        for v in values:
            col = pd.to_numeric(done[v], errors="coerce")
            row[f"mean {v}"] = col.mean() if len(done) else None
            row[f"std {v}"] = col.std(ddof=1) if len(done) > 1 else None
        rows.append(row)
    return pd.DataFrame(rows)


def write_summary(tracker, config: DictConfig, keys: List[str], final: bool = True) -> List[Dict[str, Any]]:
    import pandas as pd

    monitor = config.trainer.monitor
    mode = config.trainer.monitor_mode
    rows = child_rows(tracker.client, tracker.experiment_id, tracker.run_id, keys, monitor)
    if not rows:
        return rows
    sweep_dir = Path(str(config.hydra.sweep.dir))
    table = pd.DataFrame(rows)
    csv_path = sweep_dir / "sweep_summary.csv"
    table.to_csv(csv_path, index=False)
    settings = setting_summary(table, keys, monitor)
    settings_path = sweep_dir / "sweep_summary_by_setting.csv"
    settings.to_csv(settings_path, index=False)
    md_path = sweep_dir / "sweep_summary.md"
    md_path.write_text(_markdown(table) + "\nMean and std (n - 1) over seeds per setting:\n\n" + _markdown(settings))
    for path in (csv_path, settings_path, md_path):
        tracker.log_artifact(path)

    scored = [r for r in rows if r[f"best {monitor}"] is not None and r["status"] == "FINISHED"]
    if scored:
        pick = max if mode == "max" else min
        best = pick(scored, key=lambda r: r[f"best {monitor}"])
        tracker.set_tags({"best_run_id": best["run_id"], "best_job": best["job"], "best_overrides": best["overrides"],
                          "best_value": best[f"best {monitor}"], "monitor": monitor})
        tracker.log_metrics({f"best/{monitor}": best[f"best {monitor}"]}, step=0)
    if final:
        for key in keys:
            plot_path = _plot_metric_vs_key(table, key, f"best {monitor}", sweep_dir)
            if plot_path is not None:
                tracker.log_artifact(plot_path, "plots")
    return rows


def _markdown(table) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_cell(v) for v in r.values) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):  # None / NaN: an empty cell
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _plot_metric_vs_key(table, key: str, metric: str, out_dir: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    x = pd.to_numeric(table[key], errors="coerce")
    y = pd.to_numeric(table[metric], errors="coerce")
    ok = x.notna() & y.notna()
    if ok.sum() == 0:
        return None  # not a numeric key (e.g. loss=contrastive,siglip)
    order = x[ok].argsort()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x[ok].iloc[order], y[ok].iloc[order], marker="o")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"sweep_{key.replace('/', '_')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
