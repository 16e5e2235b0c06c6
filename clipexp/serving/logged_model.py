"""The fine-tuned CLIP as an MLflow pyfunc model: logged per run, registered on request, served by MLflow.

A tracked run that ends with ``tracking.pyfunc_model=true`` (the default) logs the model ``clip`` (an MLflow 3 LoggedModel linked
to the run and to the metrics of its last step): the ``save_pretrained`` folder with the run's
``clipexp_inference.json`` as the artifact ``clip``, this package as code (so a fresh process needs
neither a clipexp install nor its config), a signature and an input example, and pinned pip
requirements (no slow requirement inference). ``tracking.register_model=NAME`` registers it as a new
version of ``NAME``, tagged with the monitored metric and its best value.

Input: a DataFrame with ``image`` (base64-encoded image bytes: a served model opens no path it is sent, unless
``tracking.serve_file_root`` named a folder; see :mod:`clipexp.serving.policy`) and/or ``text``; ``params``
``{"task": "zero_shot" | "classify" | "embed" | "similarity"}`` (default zero_shot; classify also takes ``"head"`` and
``"alpha"``: the run's fitted heads, ``heads.pt``). Output: one row per input row,
with an ``error`` column naming any image that could not be read (the other rows are still answered);
see :func:`clipexp.serving.inference.answer_frame`. An unknown task or a missing column is one line (HTTP 400).

Load and serve::

    mlflow.pyfunc.load_model("runs:/<run id>/clip").predict(df, params={"task": "embed"})
    mlflow models serve -m runs:/<run id>/clip --env-manager local -p 5001

This is the MLflow side only (MLflow is imported when used, so a run without tracking never loads it);
the pyfunc class is :mod:`clipexp.serving.pyfunc`, the inference itself :mod:`clipexp.serving.inference`.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from clipexp.files import disk_full_error, write_folder_manifest

log = logging.getLogger(__name__)

MODEL_NAME = "clip"  # runs:/<run id>/clip
NOTE_TAG = "mlflow.note.content"  # the model page's description (Markdown)


#: the model's columns, each ``(name, MLflow type, what it holds)``: the signature and the model page's description
INPUTS = (("image", "string", "base64-encoded image bytes (PNG, JPEG, ...)"), ("text", "string", "a caption or query"))
OUTPUTS = (
    ("predicted_class", "string", "zero_shot: the class with the highest probability"),
    ("prediction", "string", "classify: the head's class"),
    ("probability", "double", "zero_shot, classify: the class's probability (classify: calibrated)"),
    ("set", "array<string>", "classify: the conformal prediction set, most probable first (holds the class 1 - alpha of the time)"),
    ("probabilities", "map<double>", "zero_shot, classify: {class: probability}"),
    ("image_embedding", "array<double>", "embed: the L2-normalised image embedding"),
    ("text_embedding", "array<double>", "embed: the L2-normalised text embedding"),
    ("scores", "array<double>", "similarity: the row's image against every text of the request"),
    ("best_text", "string", "similarity: the text with the highest score"),
    ("error", "string", "the image of this row could not be read (the other rows are answered)"),
)


def _colspec(name: str, kind: str):
    from mlflow.types import ColSpec, DataType
    from mlflow.types.schema import Array, Map

    if kind.startswith("array<"):
        return ColSpec(Array(DataType[kind[6:-1]]), name, required=False)
    if kind.startswith("map<"):
        return ColSpec(Map(DataType[kind[4:-1]]), name, required=False)
    return ColSpec(kind, name, required=False)


def _signature():
    """Typed inputs (every column optional: a task needs some of them), the columns each task answers with, and
    the ``task`` parameter."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema

    params = [ParamSpec("task", "string", "zero_shot"), ParamSpec("head", "string", None), ParamSpec("alpha", "double", None)]
    return ModelSignature(inputs=Schema([_colspec(n, k) for n, k, _ in INPUTS]), outputs=Schema([_colspec(n, k) for n, k, _ in OUTPUTS]),
                          params=ParamSchema(params))  # head, alpha: task classify (None: the run's first head, its alpha)


def model_description(run_id: str, spec: Any, example: Any) -> str:
    """The LoggedModel's description (its page in MLflow's UI, Markdown): what it holds, how to load and serve
    it, its signature, and the input example (``input_example.json`` among its artifacts)."""
    uri = f"runs:/{run_id}/{MODEL_NAME}"
    run = spec.run or {}
    best = f"{run.get('monitor')} = {run['best_value']:.4f}" if isinstance(run.get("best_value"), (int, float)) else run.get("monitor")
    text = example["text"][0] if "text" in example else ""
    rows = "\n".join(f"| `{n}` | `{k}` | {what} |" for n, k, what in INPUTS)  # (in code: `<double>` is no HTML tag there)
    outs = "\n".join(f"| `{n}` | `{k}` | {what} |" for n, k, what in OUTPUTS)
    return f"""CLIP fine-tuned by clipexp: `{run.get('model')}`, loss `{run.get('loss')}`, domain `{run.get('domain')}`; the weights \
of the run's best checkpoint ({best}). Zero-shot classes: {', '.join(f'`{c}`' for c in spec.class_names) or '(none)'}.

**Load and predict** (`pip install mlflow` and the model's `requirements.txt`):

```python
import base64, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("{uri}")
image = base64.b64encode(open("image.png", "rb").read()).decode()
model.predict(pd.DataFrame({{"image": [image]}}), params={{"task": "zero_shot"}})   # or "embed", "similarity" (with a "text" column)
model.predict(pd.DataFrame({{"image": [image]}}), params={{"task": "classify", "head": "linear", "alpha": 0.1}})  # the run's heads
```

**Serve**: `mlflow models serve -m {uri} --env-manager local -p 5001`, then POST `{{"dataframe_split": {{"columns": ["image"], \
"data": [["<base64>"]]}}, "params": {{"task": "zero_shot"}}}}` to `http://127.0.0.1:5001/invocations`.

**Input** (params: `task` = `zero_shot` (default) | `classify` (with `head`, `alpha`) | `embed` | `similarity`):

| column | type | holds |
|---|---|---|
{rows}

**Output** (one row per input row):

| column | type | holds |
|---|---|---|
{outs}

**Input example** (`input_example.json` in Artifacts): one generated {spec.image_resolution} x {spec.image_resolution} PNG and the \
text "{text}".
"""


def _input_example(resolution: int, texts: Sequence[str]):
    """One generated image (base64 PNG) and one text: self-contained, as a served request carries it."""
    import base64

    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (resolution, resolution), (128, 96, 64)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()], "text": [texts[0] if texts else "a photo"]})


def requirements() -> list:
    """Pinned to this environment's versions (what the model was logged with)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "torchvision", "transformers", "pillow", "opencv-python-headless", "numpy", "pandas"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_pyfunc_model(run_id: str, model_dir: Path, *, step: int, register_as: Optional[str] = None,
                     tags: Optional[Dict[str, str]] = None):
    """Log ``model_dir`` (save_pretrained + ``clipexp_inference.json``) as the pyfunc model ``clip`` of
    ``run_id`` (the tracking URI is the one already set); link the run's metrics at ``step``; optionally
    register it. Returns MLflow's ``ModelInfo``."""
    import mlflow
    from mlflow.models import Model

    import clipexp
    from clipexp.serving.inference import InferenceSpec
    from clipexp.serving.pyfunc import ARTIFACT, CLIPPyfuncModel
    from clipexp.tracking.tracker import source_tags

    spec = InferenceSpec.load(model_dir)
    example = _input_example(spec.image_resolution, [t.format(c) for c in spec.class_names[:1] for t in spec.prompt_templates[:1]])
    # the model page's "Logged from": the command, not __main__.py
    tags = {**source_tags(), **(tags or {}), NOTE_TAG: model_description(run_id, spec, example)}
    # the LoggedModel goes into the run's experiment (MLflow takes the active one), where runs:/<id>/clip finds it
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with warnings.catch_warnings():  # "add type hints to predict": the signature is given explicitly
        warnings.filterwarnings("ignore", message=".*type hints.*")
        logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # "python_model is cloudpickled": it is, by reference
        return Model.log(
            artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, step=step,
            python_model=CLIPPyfuncModel(), artifacts={ARTIFACT: str(model_dir)},
            code_paths=[str(Path(clipexp.__file__).parent)], pip_requirements=requirements(),
            signature=_signature(), input_example=example,
            registered_model_name=register_as, await_registration_for=60, tags=tags,
        )  # (MLflow checks the input example by loading the model and predicting it once)


def publish_model(tracker: Any, model_dir: Path, cfg: Any, *, class_names: Sequence[str], loss_fn: Any, model: Any,
                  step: int, best_value: Optional[float], eval_batch_size: int, test_pairs: Optional[Sequence[Any]] = None) -> Optional[str]:
    """The end of a run: write ``clipexp_inference.json`` into ``model_dir`` and the test split's images and
    labels as ``test_split.csv`` beside it (always), then, when tracking with ``tracking.pyfunc_model``, log
    the pyfunc model (and register it with ``tracking.register_model``).

    Returns the LoggedModel id (None when not logged). A failure to log is reported in one line and
    leaves the run, its metrics and ``model_dir`` as they are; a full disk (ENOSPC) is raised, for the trainer
    to keep its checkpoints and say how to finish (:mod:`clipexp.training.finishing`)."""
    from clipexp.serving.inference import InferenceSpec, zero_shot_temperature

    t = cfg.trainer
    mean, std = model_dir_mean_std(model_dir)
    spec = InferenceSpec(
        class_names=list(class_names), prompt_templates=list(cfg.domain.prompt_templates),
        image_resolution=int(cfg.model.image_resolution), image_interpolation=str(cfg.model.image_interpolation),
        image_mean=mean, image_std=std,
        max_sequence_length=int(cfg.model.max_sequence_length), temperature=zero_shot_temperature(loss_fn, model),
        batch_size=int(eval_batch_size),
        serve_file_root=_file_root(cfg.tracking.get("serve_file_root")),
        run={"run_id": getattr(tracker, "run_id", None), "monitor": t.monitor, "best_value": best_value,
             "domain": cfg.domain.name, "model": cfg.model.name, "loss": getattr(loss_fn, "name", "")},
    )
    spec.save(model_dir)
    write_folder_manifest(model_dir)  # SHA256SUMS: the weights, processor and spec as saved (checked when loaded)
    if test_pairs:
        import csv

        with open(Path(model_dir).parent / "test_split.csv", "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["image_path", "label"])
            rows.writerows([str(p.image_path), "" if p.label is None else p.label] for p in test_pairs)
    if not (tracker.enabled and cfg.tracking.get("pyfunc_model", True)):
        return None
    register_as = getattr(cfg.tracking, "register_model", None)
    tags = {"monitor": t.monitor, "best_value": str(best_value)}
    started, cpu = time.perf_counter(), time.process_time()
    import mlflow

    try:
        info = log_pyfunc_model(tracker.run_id, model_dir, step=step, register_as=register_as, tags=tags)
        if register_as:
            client = mlflow.MlflowClient(tracker.uri)
            version = info.registered_model_version
            client.set_model_version_tag(register_as, version, "monitor", t.monitor)
            client.set_model_version_tag(register_as, version, t.monitor, str(best_value))
            log.info("registered %s version %s (%s=%s)", register_as, version, t.monitor, best_value)
    except Exception as err:  # noqa: BLE001 - the run's work is done and kept; say what failed
        if disk_full_error(err) is not None:  # a full disk: the caller keeps the checkpoints and names the command that finishes
            raise
        log.error("could not log the MLflow model of run %s (%s: %s); the weights are in %s",
                  tracker.run_id, type(err).__name__, str(err).splitlines()[0] if str(err) else "", model_dir)
        return None
    log.info("logged MLflow model runs:/%s/%s (model id %s) in %.1f s (%.1f s of CPU)", tracker.run_id, MODEL_NAME, info.model_id,
             time.perf_counter() - started, time.process_time() - cpu)
    return info.model_id


def _file_root(root: Optional[str]) -> Optional[str]:
    return str(Path(root).expanduser().resolve()) if root else None


def model_dir_mean_std(model_dir: Path):
    """The image mean/std the run normalised with: its saved image processor's."""
    import json

    from clipexp.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get("image_processor", data)
            if "image_mean" in data and "image_std" in data:
                return list(data["image_mean"]), list(data["image_std"])
    return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)


def download_model(uri: str, tracking_uri: Optional[str], dst: Path) -> Path:
    """A ``runs:/`` or ``models:/`` URI (or a run id) -> the local ``save_pretrained`` folder inside it."""
    import mlflow

    from clipexp.serving.inference import SPEC_FILE

    if "://" not in uri and ":/" not in uri:
        uri = f"runs:/{uri}/{MODEL_NAME}"
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    found = sorted(local.rglob(SPEC_FILE))
    if not found:
        raise FileNotFoundError(f"{uri} is not a clipexp model (no {SPEC_FILE} inside); give a run's model or a save_pretrained folder")
    return found[0].parent
