"""Everything MLflow, behind one small interface (``Tracker``); ``NullTracker`` when tracking is off.

Conventions (DESIGN.md): one run per Hydra job; params are the flattened resolved config; tags carry
domain, loss, model, git commit and the Hydra overrides; the default store is one SQLite file at the
project root, addressed by an absolute path so every job of a sweep shares it wherever it runs from.
Store creation and experiment creation are guarded by a file lock, so parallel jobs can start at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

from clipexp.config import PROJECT_ROOT

log = logging.getLogger(__name__)

def default_tracking_uri() -> str:
    return f"sqlite:///{(PROJECT_ROOT / 'mlflow.db').resolve()}"


def resolve_uri(uri: Optional[str]) -> str:
    """Make a relative ``sqlite:///x.db`` or a bare path absolute (relative to the current directory
    *now*, before anything else runs), so jobs that start elsewhere still share the same store."""
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock next to a SQLite/file store (no-op for servers) guarding schema and experiment creation."""
    if uri.startswith("sqlite:///"):
        lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    elif uri.startswith("file://"):
        lock_path = Path(uri[len("file://"):]) / ".clipexp.lock"
    else:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (MLflow shows them as strings)."""
    out: Dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def git_commit(root: Path = PROJECT_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ensure_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another process created it between our two calls
        return client.get_experiment_by_name(name).experiment_id


class NullTracker:
    """Tracking off: every call is accepted and does nothing."""

    enabled = False
    run_id: Optional[str] = None
    uri: Optional[str] = None
    experiment_id: Optional[str] = None

    def start(self, *args, **kwargs) -> "NullTracker":
        return self

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None: ...
    def log_artifacts(self, path: Path, artifact_path: Optional[str] = None) -> None: ...
    def log_dict(self, data: Any, name: str) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...

    @property
    def run_url(self) -> str:
        return "(tracking disabled)"


class Tracker(NullTracker):
    """One MLflow run. Uses ``MlflowClient`` with an explicit run id, so nothing depends on MLflow's
    global active-run state (safe for resume, sweeps and parallel jobs)."""

    enabled = True

    def __init__(self, uri: Optional[str] = None, experiment: str = "clipexp"):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self.experiment = experiment
        with store_lock(self.uri):  # first use of a new SQLite store creates its schema: one process at a time
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            self.experiment_id = ensure_experiment(self.client, experiment)
        self.run_id: Optional[str] = None
        self._system_metrics = None

    def start(self, run_name: Optional[str] = None, tags: Optional[Mapping[str, Any]] = None,
              run_id: Optional[str] = None, parent_run_id: Optional[str] = None, system_metrics: bool = False) -> "Tracker":
        """Start a new run, or continue ``run_id`` (resume)."""
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {k: str(v) for k, v in (tags or {}).items()}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._system_metrics = SystemMetricsMonitor(self.run_id)
                self._system_metrics.start()
            except Exception as err:  # noqa: BLE001 - optional extra; never fail a run for it
                log.warning("system metrics are unavailable: %s", err)
        return self

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), name)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        if self._system_metrics is not None:
            with contextlib.suppress(Exception):
                self._system_metrics.finish()
        self.client.set_terminated(self.run_id, status=status)

    @property
    def run_url(self) -> str:
        return f"{self.uri}  experiment={self.experiment_id} run={self.run_id}"


def make_tracker(enabled: bool, uri: Optional[str], experiment: str):
    return Tracker(uri, experiment) if enabled else NullTracker()


def overrides_run_name(overrides: list[str]) -> str:
    """A short run name from the command-line overrides (hydra.* and tracking.* left out)."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("hydra", "tracking", "trainer.resume"))]
    return ",".join(keep)[:250] or "default"

