"""Everything MLflow, behind one small interface (``Tracker``); ``NullTracker`` when tracking is off.

Conventions (DESIGN.md): one run per Hydra job; params are the flattened resolved config; tags carry
domain, loss, model, git commit (also as MLflow's ``mlflow.source.*`` tags, the UI's Source column) and the
Hydra overrides; the datasets are the run's inputs (the UI's Dataset column); the experiment is tagged a
model-training experiment (``mlflow.experimentKind``). Where the store lives: :func:`default_tracking_uri`.
Store creation and experiment creation are guarded by a file lock, so parallel jobs can start at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

from clipexp.errors import UserError
from clipexp.paths import PROJECT_ROOT
from clipexp.tracking.outbox import Outbox, read_spool

log = logging.getLogger(__name__)

# MLflow 3's UI opens an experiment with this tag set to custom_model_development on its training runs
# ("Machine learning" / "Model training"), not on the GenAI overview (traces, sessions)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
ARTIFACTS_DIR = "mlartifacts"


def default_tracking_uri() -> str:
    """The store rule, the same for every command (``clipexp train``, sweeps, ``predict``, ``replay``, ``ui``):

    1. ``tracking.uri`` (``--tracking-uri``, ``--backend-store-uri``) when given; a relative
       ``sqlite:///x.db`` or a bare path is made absolute against the current folder;
    2. else the ``MLFLOW_TRACKING_URI`` environment variable, as for any MLflow program;
    3. else ``sqlite:///<current folder>/mlflow.db``: the folder the command is started in, where Hydra
       also writes ``outputs/`` and ``multirun/`` (no chdir) and where a plain ``mlflow ui`` looks.

    A SQLite store keeps the artifacts of the experiments it creates in ``mlartifacts/`` beside the
    ``.db`` file (``<current folder>/mlartifacts`` by default; an experiment created earlier keeps its
    own location); a tracking server (``http://...``) stores them where it is configured to.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return resolve_uri(env)
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def artifact_root(uri: str) -> Optional[Path]:
    """``mlartifacts/`` beside a SQLite store's file (None for other stores: they place artifacts themselves)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR
    return None


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


def source_tags(command: str = "clipexp train", root: Path = PROJECT_ROOT) -> Dict[str, str]:
    """MLflow's own source tags (the runs table's Source column, the run page's "Created by"): the command, LOCAL,
    the git commit and branch, the user."""
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
    with contextlib.suppress(Exception):  # no user name (a container without a passwd entry): left out
        import getpass

        tags["mlflow.user"] = getpass.getuser()
    commit = git_commit(root).removesuffix("-dirty")
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if branch.returncode == 0 and branch.stdout.strip() not in ("", "HEAD"):
            tags["mlflow.source.git.branch"] = branch.stdout.strip()
    return tags


def ensure_experiment(client, name: str, uri: Optional[str] = None) -> str:
    """The id of experiment ``name``, created if needed: tagged a model-training experiment, its artifacts
    under :func:`artifact_root` for a SQLite store. An existing experiment without the kind tag gets it."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            with contextlib.suppress(Exception):  # a read-only store still trains
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    root = artifact_root(uri) if uri else None
    location = str(root / re.sub(r"[^A-Za-z0-9._-]+", "_", name)) if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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
    def log_inputs(self, datasets: Sequence[Mapping[str, Any]]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...

    @property
    def run_url(self) -> str:
        return "(tracking disabled)"


class Tracker(NullTracker):
    """One MLflow run. Uses ``MlflowClient`` with an explicit run id, so nothing depends on MLflow's
    global active-run state (safe for resume, sweeps and parallel jobs).

    Creating or continuing the run talks to the store at once (a wrong URI fails there, before any
    training). Every write after that (params, tags, metrics, artifacts, the final status) goes through
    an :class:`~clipexp.tracking.outbox.Outbox`: a background thread delivers it, so training never waits on
    the store, and a store that is locked or stops mid-run costs one warning, not the run: the writes
    are held and retried every ``retry_s`` seconds, and ``end`` waits up to ``end_timeout_s`` for them.
    What is still undelivered then goes to ``<run_dir>/mlflow_pending.jsonl`` (``replay_pending``
    sends it later).
    """

    enabled = True
    PENDING_FILE = "mlflow_pending.jsonl"
    JOURNAL_FILE = "mlflow_journal.jsonl"  # every write of the run, in order: what replay recreates a vanished run from

    def __init__(self, uri: Optional[str] = None, experiment: str = "clipexp", run_dir: Optional[Path] = None,
                 retry_s: float = 30.0, end_timeout_s: float = 60.0):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self.experiment = experiment
        with store_lock(self.uri):  # first use of a new SQLite store creates its schema: one process at a time
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            self.experiment_id = ensure_experiment(self.client, experiment, self.uri)
        self.run_id: Optional[str] = None
        self._system_metrics = None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.retry_s, self.end_timeout_s = retry_s, end_timeout_s
        self.outbox: Optional[Outbox] = None
        self._store_file = Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None
        self._store_id = _file_id(self._store_file)

    def start(self, run_name: Optional[str] = None, tags: Optional[Mapping[str, Any]] = None,
              run_id: Optional[str] = None, parent_run_id: Optional[str] = None, system_metrics: bool = False) -> "Tracker":
        """Start a new run, or continue ``run_id`` (resume)."""
        if run_id is not None:
            self.run_id = run_id
            _retrying(self.client.update_run, run_id, status="RUNNING")
        else:
            all_tags = {k: str(v) for k, v in (tags or {}).items()}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = _retrying(self.client.create_run, self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
            self._journal("start", {"run_name": run.info.run_name, "tags": all_tags})
        spool = None
        if self.run_dir is not None:  # what replay_pending needs to find this run again
            spool = self.run_dir / self.PENDING_FILE
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / RUN_FILE).write_text(json.dumps({"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id}))
        self.outbox = Outbox(self._deliver, store_error_is_retryable, self.uri, retry_s=self.retry_s, spool=spool,
                             quiet_loggers=QUIET_WHEN_OFFLINE, gone=self.store_gone)
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                # CPU, memory, disk, network (GPU with pynvml) every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (10)
                self._system_metrics = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri, resume_logging=run_id is not None)
                self._system_metrics.start()
            except Exception as err:  # noqa: BLE001 - optional extra; never fail a run for it
                log.warning("system metrics are unavailable: %s", err)
        return self

    def store_gone(self) -> Optional[str]:
        """Why the run's store is gone (its SQLite file deleted or replaced since the run started), else None."""
        if self._store_file is None or self._store_id is None:
            return None
        now = _file_id(self._store_file)
        if now == self._store_id:
            return None
        what = "was deleted" if now is None else "was replaced by another file"
        return f"the store {self.uri} {what} while the run was writing to it"

    def _journal(self, kind: str, payload: Any) -> None:
        if self.run_dir is not None:
            try:
                with open(self.run_dir / self.JOURNAL_FILE, "a") as fh:
                    fh.write(json.dumps({"kind": kind, "payload": payload}, default=str) + "\n")
            except OSError as err:  # the run folder keeps metrics.json; the journal is what a vanished store needs
                log.debug("tracking: journal not written: %s", err)

    def _put(self, kind: str, payload: Any) -> None:
        self._journal(kind, payload)
        self.outbox.put(kind, payload)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = {k: str(v)[:6000] for k, v in params.items()}
        keys = list(items)
        for i in range(0, len(keys), 100):
            self._put("params", {k: items[k] for k in keys[i:i + 100]})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._put("tags", {k: str(v)[:5000] for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if values:
            self._put("metrics", {"values": values, "step": int(step), "timestamp": int(time.time() * 1000)})

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._put("artifact", {"path": str(path), "artifact_path": artifact_path})

    def log_artifacts(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._put("artifacts", {"path": str(path), "artifact_path": artifact_path})

    def log_dict(self, data: Any, name: str) -> None:
        self._put("text", {"text": json.dumps(data, indent=2, default=str), "name": name})

    def log_inputs(self, datasets: Sequence[Mapping[str, Any]]) -> None:
        """The run's datasets as MLflow run inputs (the UI's Dataset column): each ``{"name", "table"
        (a pandas DataFrame, one row per pair), "source" (path or id), "context" (training, validation, test)}``;
        MLflow computes each table's digest and schema."""
        import warnings

        import mlflow.data

        entities = []
        for d in datasets:
            with warnings.catch_warnings():  # the source registry warns that a plain path resolves to a local source
                warnings.simplefilter("ignore")
                e = mlflow.data.from_pandas(d["table"], source=str(d["source"]), name=d["name"])._to_mlflow_entity()
            entities.append({"name": e.name, "digest": e.digest, "source_type": e.source_type, "source": e.source,
                             "schema": e.schema, "profile": e.profile, "context": d["context"]})
        if entities:
            self._put("inputs", {"datasets": entities})

    def _deliver(self, kind: str, payloads: list) -> None:
        """One store call for ``payloads`` (several only for metrics, merged into one batch)."""
        from mlflow.entities import Metric, Param, RunTag

        c, run = self.client, self.run_id
        if kind == "metrics":
            c.log_batch(run, metrics=[Metric(k, v, p["timestamp"], p["step"]) for p in payloads for k, v in p["values"].items()])
        elif kind in ("params", "tags"):
            entity = Param if kind == "params" else RunTag
            c.log_batch(run, **{kind: [entity(k, v) for p in payloads for k, v in p.items()]})
        elif kind in ("artifact", "artifacts"):
            for p in payloads:
                (c.log_artifact if kind == "artifact" else c.log_artifacts)(run, p["path"], p["artifact_path"])
        elif kind == "text":
            for p in payloads:
                c.log_text(run, p["text"], p["name"])
        elif kind == "inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            c.log_inputs(run, datasets=[DatasetInput(Dataset(**{k: v for k, v in d.items() if k != "context"}),
                                                     [InputTag("mlflow.data.context", d["context"])])
                                        for p in payloads for d in p["datasets"]])
        elif kind == "end":
            c.set_terminated(run, status=payloads[-1]["status"])
        else:
            raise ValueError(f"unknown tracking write {kind!r}")

    def end(self, status: str = "FINISHED") -> None:
        """Deliver everything, then the run's final status; never raises for the store's sake."""
        if self.run_id is None or self.outbox is None:
            return
        if self._system_metrics is not None:  # its thread may be inside a store call: waited for as long as the writes, no longer
            import threading

            stopper = threading.Thread(target=self._system_metrics.finish, name="clipexp-system-metrics-stop", daemon=True)
            stopper.start()
            stopper.join(timeout=self.end_timeout_s)
        self._put("end", {"status": status})
        outbox, self.outbox = self.outbox, None
        left = outbox.close(0.0 if outbox.gone_reason else self.end_timeout_s)
        if left and outbox.gone_reason:
            log.warning("tracking: %d writes of run %s are in %s (the store is gone); `clipexp replay %s` recreates the run",
                        len(left), self.run_id, outbox.spool, outbox.spool.parent if outbox.spool else "<run dir>")
        elif left:
            n_metrics = sum(len(p.get("values", ())) for k, p in left if k == "metrics")
            where = f"in {outbox.spool}" if outbox.spool else "lost (no run folder)"
            log.warning("tracking: the store %s is still unreachable after waiting %g s; %d writes (%d metric values and "
                        "the final status %s) are %s; the run folder's metrics.json is complete. Send them later with "
                        "`clipexp replay %s`", self.uri, self.end_timeout_s, len(left), n_metrics,
                        status, where, outbox.spool.parent if outbox.spool else "<run dir>")

    @property
    def run_page_url(self) -> str:
        """The run's page in MLflow's UI, in model-training mode (:func:`clipexp.tracking.ui.run_page_url`): a
        tracking server's own address, else where ``clipexp ui`` serves this store (http://127.0.0.1:5000)."""
        from clipexp.tracking.ui import run_page_url, ui_base

        return run_page_url(ui_base(self.uri), self.experiment_id, self.run_id)

    @property
    def run_url(self) -> str:
        """What the end of a run prints after ``mlflow:``: the run's page, and for a local store how to serve it."""
        served = "" if self.uri.startswith(("http://", "https://")) else f" (`clipexp ui` serves {self.uri})"
        return f"{self.run_page_url}{served}"


RUN_FILE = "mlflow_run.json"  # in the run folder: the store, experiment and run id of its MLflow run
# the libraries' own log lines for a failing store call, dropped while the outbox's one warning stands for them
QUIET_WHEN_OFFLINE = ("mlflow.store.db.utils", "mlflow.utils.rest_utils", "urllib3.connectionpool",
                      "mlflow.system_metrics.system_metrics_monitor", "mlflow.utils.async_logging.async_logging_queue")


def store_error_is_retryable(err: BaseException) -> bool:
    """A store that is down, locked or overloaded: retry. A request it refuses (4xx: a bad value, a
    deleted run): do not."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return not (400 <= status < 500) or status == 429
    return not isinstance(err, (ValueError, TypeError, KeyError))


def _retrying(call, *args, attempts: int = 4, wait_s: float = 2.0, **kwargs):
    """A call that must land before training (creating or reopening the run), retried a few times when
    the store is busy (several parallel jobs' SQLite writes can collide) before the error is raised."""
    import time

    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised below unless the store may answer next time
            if attempt == attempts - 1 or not store_error_is_retryable(err):
                raise
            time.sleep(wait_s * 2 ** attempt)


def make_tracker(enabled: bool, uri: Optional[str], experiment: str, run_dir: Optional[Path] = None,
                 retry_s: float = 30.0, end_timeout_s: float = 60.0):
    return Tracker(uri, experiment, run_dir, retry_s, end_timeout_s) if enabled else NullTracker()


def replay_pending(run_dir: Path, uri: Optional[str] = None) -> Dict[str, Any]:
    """Send the writes a run could not deliver (``<run_dir>/mlflow_pending.jsonl``) to its store now.

    The run id and the store come from the run folder's files unless ``uri`` is given. When the store no longer
    has the run (its SQLite file was deleted or replaced, or ``uri`` names another store), the run is recreated
    there from the run folder's journal (``mlflow_journal.jsonl``: its name, tags, params, metrics, artifacts and
    final status, in order) and ``mlflow_run.json`` then names the new run. Returns ``{"sent", "run_id",
    "recreated_from"}`` (the old run id when it was recreated)."""
    from mlflow.exceptions import MlflowException

    run_dir = Path(run_dir)
    spool, journal = run_dir / Tracker.PENDING_FILE, run_dir / Tracker.JOURNAL_FILE
    meta = json.loads((run_dir / RUN_FILE).read_text())
    tracker = Tracker(uri or meta["uri"], meta["experiment"])
    try:
        tracker.client.get_run(meta["run_id"])
        missing = False
    except MlflowException as err:
        if err.get_http_status_code() != 404 and "not found" not in str(err):
            raise
        missing = True
    if not missing:
        tracker.run_id = meta["run_id"]
        writes = read_spool(spool) if spool.is_file() else []
        for kind, payload in writes:  # one call each, in order: the store is there now
            tracker._deliver(kind, [payload])
        if spool.is_file():
            spool.rename(spool.with_name(spool.name + ".sent"))
        return {"sent": len(writes), "run_id": tracker.run_id, "recreated_from": None}
    if not journal.is_file():
        raise ReplayError(f"the store {tracker.uri} has no run {meta['run_id']} and {run_dir} has no {Tracker.JOURNAL_FILE} to "
                          f"recreate it from (a run of an older clipexp): its metrics.json and checkpoints are complete")
    writes = read_spool(journal)
    start = next((p for k, p in writes if k == "start"), {"run_name": run_dir.name, "tags": {}})
    tags = {k: v for k, v in start["tags"].items() if k != "mlflow.parentRunId"}  # (the parent is gone with the store)
    run = _retrying(tracker.client.create_run, tracker.experiment_id, run_name=start["run_name"], tags=tags)
    tracker.run_id = run.info.run_id
    sent = 0
    for kind, payload in writes:
        if kind not in ("start", "recreated"):  # (the journal's own records)
            tracker._deliver(kind, [payload])
            sent += 1
    (run_dir / RUN_FILE).write_text(json.dumps({"uri": tracker.uri, "experiment": tracker.experiment, "run_id": tracker.run_id,
                                                "recreated_from": meta["run_id"]}))
    with open(journal, "a") as fh:  # later replays recreate the same run's writes from the same journal
        fh.write(json.dumps({"kind": "recreated", "payload": {"old": meta["run_id"], "new": tracker.run_id}}) + "\n")
    if spool.is_file():
        spool.rename(spool.with_name(spool.name + ".sent"))
    return {"sent": sent, "run_id": tracker.run_id, "recreated_from": meta["run_id"]}


class ReplayError(UserError):
    """A run that cannot be replayed: one line saying why and what is kept."""


def _file_id(path: Optional[Path]) -> Optional[tuple]:
    """(device, inode) of a file, or None when there is none: the same path with another id is another file."""
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino)