"""Where MLflow's UI shows a run, and how an experiment opens there (MLflow 3.17's web UI).

* **Model-training mode.** MLflow 3.17's UI opens every experiment on its GenAI overview (traces, token
  usage) unless the address says ``workflowType=machine_learning``: the UI reads that query parameter
  first, then the browser's own choice (the *GenAI / Model training* switch in the sidebar, kept in the
  browser's ``localStorage`` as ``mlflow.workflowType_v1``), then falls back to GenAI. The experiment tag
  ``mlflow.experimentKind`` (which clipexp sets) is not consulted for it, and there is no server flag or
  environment variable. So every address clipexp prints carries the parameter: :func:`runs_page_url`,
  :func:`run_page_url`, :func:`model_page_url`.
* **The runs table's columns.** The UI's experiment-level setting for them is a *saved view*: an experiment
  tag ``mlflow.sharedViewState.<id>`` holding the table's columns and sort, listed under *Views* and opened
  by ``viewStateShareKey=<id>`` in the address. :func:`set_runs_view` saves one (:data:`VIEW_ID`) with the
  monitored metric's best, final and test columns, sorted by the best value; :func:`runs_page_url` opens it.
* **The address of a store.** A tracking server (``http://...``) serves its own UI; a SQLite or file store
  is served by ``clipexp ui`` (``mlflow ui``) at :data:`DEFAULT_UI` unless told otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Optional
from urllib.parse import quote

DEFAULT_UI = "http://127.0.0.1:5000"  # `clipexp ui` / `mlflow ui` with their default host and port
TRAINING_MODE = "workflowType=machine_learning"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_ID = "clipexp"  # the saved view clipexp keeps in each experiment: mlflow.sharedViewState.clipexp
#: of the columns MLflow's runs table shows by default (Source, Models, Dataset), those the saved view keeps: the
#: wide Dataset column would push the metrics out of a laptop's window (it stays one click away, under Columns)
VIEW_ATTRIBUTE_COLUMNS = ("attributes.`Source`", "attributes.`Models`")
#: the ids of the runs table's fixed columns (MLflow 3.17's grid), for the saved view's column order
RUN_NAME_COLUMN, CREATED_COLUMN, DURATION_COLUMN = "attributes.`Run Name`", "runDateAndNestInfo", "duration"


def ui_base(tracking_uri: Optional[str], default: str = DEFAULT_UI) -> str:
    """The address of the UI that shows ``tracking_uri``'s runs: a tracking server's own address, else
    ``default`` (where ``clipexp ui`` serves a SQLite or file store)."""
    uri = (tracking_uri or "").strip()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return default.rstrip("/")


def runs_page_url(base: str, experiment_id: str, view: Optional[str] = None) -> str:
    """The experiment's runs table in model-training mode (with the saved view ``view``, if given)."""
    url = f"{base.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs?{TRAINING_MODE}"
    return url + (f"&viewStateShareKey={quote(view)}" if view else "")


def run_page_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page (overview, model metrics, system metrics, artifacts) in model-training mode."""
    return f"{base.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}?{TRAINING_MODE}"


def model_page_url(base: str, experiment_id: str, model_id: str) -> str:
    """A LoggedModel's page (``runs:/<run id>/clip``): description, metrics, artifacts."""
    return f"{base.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/models/{quote(model_id)}?{TRAINING_MODE}"


def metric_column(name: str) -> str:
    """A metric's column (and sort key) in MLflow's runs table: ``metrics.`name```."""
    return f"metrics.`{name}`"


def runs_view(monitor: str, mode: str = "max", now_ms: Optional[int] = None) -> Dict[str, Any]:
    """The saved view (MLflow 3.17's envelope ``{name, createdAt, updatedAt, state}``, ``state`` a JSON string of
    the table's settings): Source, Models, ``best/<monitor>``, ``test/<metric>`` and the final ``<monitor>``,
    sorted by ``best/<monitor>`` (highest first for ``mode=max``)."""
    metric = monitor.split("/", 1)[1] if "/" in monitor else monitor
    columns = [*VIEW_ATTRIBUTE_COLUMNS, metric_column(f"best/{monitor}"), metric_column(f"test/{metric}"), metric_column(monitor)]
    metrics = [c for c in columns if c.startswith("metrics.")]
    # the metrics right after the run's name, wide enough to read their names (MLflow applies widths to the ordered columns)
    order = [RUN_NAME_COLUMN, CREATED_COLUMN, *metrics, DURATION_COLUMN, *VIEW_ATTRIBUTE_COLUMNS]
    widths = {RUN_NAME_COLUMN: 300, **{c: 50 + 7 * (len(c) - len("metrics.``")) for c in metrics}}
    state = {"selectedColumns": columns, "columnOrder": order, "columnWidths": widths,
             "orderByKey": metric_column(f"best/{monitor}"), "orderByAsc": mode == "min"}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return {"name": f"clipexp: best {monitor}", "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)}


def set_runs_view(client: Any, experiment_id: str, monitor: str, mode: str = "max") -> None:
    """Save :func:`runs_view` as the experiment's view :data:`VIEW_ID` (kept when it already shows ``monitor``)."""
    key = VIEW_TAG_PREFIX + VIEW_ID
    current = client.get_experiment(experiment_id).tags.get(key)
    wanted = runs_view(monitor, mode)
    if current is not None:
        try:
            if json.loads(json.loads(current)["state"]) == json.loads(wanted["state"]):
                return
        except (ValueError, KeyError, TypeError):
            pass  # not one of ours, or damaged: written again
    client.set_experiment_tag(experiment_id, key, json.dumps(wanted))


def experiment_view(tags: Dict[str, str]) -> Optional[str]:
    """:data:`VIEW_ID` when the experiment (its ``tags``) has that saved view, else None."""
    return VIEW_ID if VIEW_TAG_PREFIX + VIEW_ID in tags else None


def landing_url(client: Any, base: str, experiment: Optional[str] = None) -> Optional[str]:
    """What ``clipexp ui`` opens: the runs of ``experiment`` (a name), else of the experiment whose run
    started last; None when the store has no such experiment or no runs."""
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
    else:
        from mlflow.entities import ViewType

        latest = client.search_runs(
            [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)] or ["0"],
            order_by=["attributes.start_time DESC"], max_results=1)
        exp = client.get_experiment(latest[0].info.experiment_id) if latest else None
    if exp is None:
        return None
    return runs_page_url(base, exp.experiment_id, experiment_view(exp.tags))


def served_base(host: str, port: int) -> str:
    """The address ``mlflow ui --host host --port port`` answers at on this machine."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def ui_addresses(store: str, base: str, run: Optional[Dict[str, str]] = None, experiment: Optional[str] = None) -> Dict[str, str]:
    """The addresses ``clipexp ui`` prints for ``store`` served at ``base``: ``runs`` (the experiment's runs
    table in model-training mode: ``experiment``'s, else ``run``'s, else the one with the latest run) and, for
    a ``run`` (a run folder's ``mlflow_run.json``: ``experiment``, ``run_id``), ``run``. A store that does not
    exist yet, or has no runs, gets the experiments list."""
    out = {"runs": f"{base.rstrip('/')}/#/experiments?{TRAINING_MODE}"}
    if store.startswith("sqlite:///") and not os.path.isfile(store[len("sqlite:///"):]):
        return out  # nothing logged yet (and reading it would create it)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    name = experiment or (run or {}).get("experiment")
    landing = landing_url(client, base, name)
    if landing is not None:
        out["runs"] = landing
    if run and run.get("run_id"):
        try:
            info = client.get_run(run["run_id"]).info
            out["run"] = run_page_url(base, info.experiment_id, info.run_id)
        except Exception:  # noqa: BLE001 - a run folder whose run is not in this store: the runs table still opens
            pass
    return out


def graphical_browser() -> bool:
    """Whether :mod:`webbrowser` would open a window (not a terminal browser such as lynx, which would take
    over the console the server logs to): macOS, Windows, or a Linux desktop session (DISPLAY / WAYLAND_DISPLAY)."""
    if sys.platform == "darwin" or os.name == "nt":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def open_when_up(url: str, health_url: str, timeout_s: float = 120.0) -> bool:
    """Wait for the server (``health_url`` answers), then open ``url`` in the desktop's browser."""
    import urllib.request
    import webbrowser

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=2):
                return webbrowser.open(url)
        except OSError:
            time.sleep(0.5)
    return False


if __name__ == "__main__":  # python -m clipexp.tracking.ui <url> <health url>: what `clipexp ui` starts beside the server
    open_when_up(sys.argv[1], sys.argv[2])
