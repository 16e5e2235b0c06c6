"""Batch tools for a fine-tuned model: ``clipexp predict classify | zero_shot | embed | search``.

::

    clipexp predict classify --model outputs/2026-12-02/10-00-00.000000 --images test.csv --head linear --out preds.csv
    clipexp predict zero_shot --model outputs/2026-12-02/10-00-00.000000 --images test.csv --out preds.csv
    clipexp predict embed --model runs:/<run id>/clip --images photos/ --out photos.parquet
    clipexp predict search --model <run id> --embeddings photos.parquet --query "a local defect" --top-k 5

``--model``: a run id or ``runs:/<id>/clip`` / ``models:/NAME/VERSION`` URI (``--tracking-uri``, default
the store rule of :func:`clipexp.tracking.tracker.default_tracking_uri`), a run folder (``outputs/...``, its ``model/``) or a ``save_pretrained`` folder (a
folder without ``clipexp_inference.json``, e.g. a hub model, needs ``--classes`` for zero_shot).
``--images``: a folder (searched recursively; a first-level subfolder named like a class is that image's
label) or a CSV with an ``image_path`` column (``--image-column``; relative paths are relative to the
CSV) and optionally ``label``. Images are prepared exactly as the trainer's evaluation prepares them
(:mod:`clipexp.serving.inference`), so on a run's test split ``zero_shot`` gives the run's test accuracy and
``classify`` the run's ``test/<head>/...`` figures (accuracy, ECE, coverage, set size).
An image that cannot be read is reported on its row (``error``) and the others are still answered.

``classify`` uses the run's fitted heads (``model/heads.pt``: calibrated probabilities, conformal prediction sets), or
with ``--exemplars folder/`` (one sub-folder of images per class) heads fitted on those images: half of each class's
exemplars (drawn with seed 0, at least one kept) fit the head, the other half calibrates its temperature and sets.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from clipexp.errors import UserError
from clipexp.serving.embeddings import EMBEDDING_SUFFIXES, read_embeddings, write_embeddings
from clipexp.names import HEADS

PROG = "clipexp predict"


class PredictError(UserError, ValueError):
    """A user error: one line."""


# ------------------------------------------------------------------------------------------ inputs
def resolve_model(source: str, tracking_uri: Optional[str], tmp: Path) -> Path:
    """``--model`` -> a local ``save_pretrained`` folder."""
    path = Path(source).expanduser()
    if path.is_dir():
        for candidate in (path, path / "model"):
            if (candidate / "config.json").is_file() or (candidate / "open_clip_config.json").is_file():
                return candidate
        raise PredictError(f"--model {source}: no config.json there or in its model/ folder; give a run folder or a save_pretrained folder")
    if source.startswith(("runs:/", "models:/")) or re.fullmatch(r"[0-9a-f]{32}", source):
        from clipexp.serving.logged_model import download_model
        from clipexp.tracking.tracker import resolve_uri

        try:
            return download_model(source, resolve_uri(tracking_uri), tmp)
        except Exception as err:  # noqa: BLE001 - MLflow's errors are long; one line here
            raise PredictError(f"--model {source}: cannot download it from {resolve_uri(tracking_uri)} "
                               f"({str(err).splitlines()[0]}); check the run id / URI and --tracking-uri") from None
    raise PredictError(f"--model {source}: not a folder, a run id, or a runs:/ or models:/ URI")


def read_images(source: str, image_column: str, label_column: str, flag: str = "--images") -> Tuple[List[str], Optional[List[Optional[str]]]]:
    """``--images`` (folder or CSV) -> (image paths, labels or None). ``flag``: the option named in errors."""
    from clipexp.data.pairs import IMAGE_EXTENSIONS

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise PredictError(f"{flag} {source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        labels = [p.relative_to(path).parts[0] if len(p.relative_to(path).parts) > 1 else None for p in files]
        return [str(p) for p in files], labels if any(labels) else None
    if path.suffix.lower() == ".csv" and path.is_file():
        import pandas as pd

        frame = pd.read_csv(path)
        if image_column not in frame.columns:
            raise PredictError(f"{flag} {source}: no column '{image_column}' (columns: {', '.join(frame.columns)}); set --image-column")
        paths = [str(p) if Path(str(p)).is_absolute() else str(path.parent / str(p)) for p in frame[image_column]]
        labels = None
        if label_column in frame.columns:
            labels = [None if pd.isna(v) else str(v) for v in frame[label_column]]
        return paths, labels
    raise PredictError(f"{flag} {source}: not a folder or a .csv file")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- tasks
def zero_shot(inf, paths: List[str], labels: Optional[List[Optional[str]]], out: Path, progress: bool) -> dict:
    """Write the predictions CSV; with labels, accuracy and the confusion matrix (``<out>.confusion.csv``)."""
    import pandas as pd
    import torch

    from clipexp.evaluate import zero_shot_metrics

    names = list(inf.spec.class_names)
    class_embeds = inf.class_embeddings()
    with _progress(len(paths), progress, "zero_shot") as bar:
        embeds, errors = inf.embed_sources(paths, progress=bar)
    ok = [i for i, e in enumerate(errors) if e is None]
    probs, preds = inf.zero_shot(embeds[ok]) if ok else (torch.zeros(0, len(names)), torch.zeros(0, dtype=torch.long))
    rows = _rows(paths, labels, errors, ok, names, probs, {"predicted_class": [names[int(p)] for p in preds],
                                                          "probability": probs.gather(1, preds[:, None])[:, 0].tolist()})
    summary = {"images": len(paths), "answered": len(ok), "errors": len(paths) - len(ok)}
    if labels is not None:
        index = {c: i for i, c in enumerate(names)}
        keep = _scored(labels, ok, names)
        if keep:
            m = zero_shot_metrics(embeds[keep], torch.tensor([index[labels[i]] for i in keep]), class_embeds)
            confusion = pd.DataFrame(m.pop("confusion").numpy(), index=[f"true {c}" for c in names], columns=[f"pred {c}" for c in names])
            confusion.to_csv(out.with_suffix(".confusion.csv"))
            summary.update(labelled=len(keep), **m)
            summary["confusion"] = confusion
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out, index=False)
    return summary


def _rows(paths: List[str], labels: Optional[List[Optional[str]]], errors: List[Optional[str]], ok: List[int], names: List[str],
          probs, answers: dict):
    """The predictions table: ``path``, ``label`` (with labels), the ``answers`` (column -> one value per ``ok`` row),
    ``error``, then ``p(<class>)`` per class; rows not ``ok`` keep empty answers."""
    import pandas as pd

    rows = pd.DataFrame({"path": paths})
    if labels is not None:
        rows["label"] = labels
    for column, values in answers.items():
        numbers = bool(values) and all(isinstance(v, float) for v in values)
        rows[column] = pd.Series([None] * len(paths), dtype=float if numbers else object)
        rows.loc[ok, column] = values
    rows["error"] = errors
    for k, name in enumerate(names):
        rows[f"p({name})"] = float("nan")
        rows.loc[ok, f"p({name})"] = probs[:, k].numpy()
    return rows


def _scored(labels: List[Optional[str]], ok: List[int], names: List[str]) -> List[int]:
    """The rows whose label is one of ``names`` (a note names the other labels: not scored)."""
    unknown = sorted({lab for lab in labels if lab is not None and lab not in names})
    if unknown:
        print(f"{PROG}: note: labels {unknown} are not among the model's classes {names}; those rows are not scored", file=sys.stderr)
    return [i for i in ok if labels[i] in names]


def classify(inf, paths: List[str], labels: Optional[List[Optional[str]]], out: Path, progress: bool, head: Optional[str],
             alpha: Optional[float]) -> dict:
    """Write the predictions CSV of a head (``inf.heads``): ``prediction``, ``probability`` (calibrated), ``set`` (the
    prediction set's classes, most probable first, joined by ``|``; empty when the head has no calibration). With
    labels: accuracy, balanced accuracy, ECE and, with sets, coverage and mean set size."""
    import torch

    from clipexp.heads.calibration import expected_calibration_error
    from clipexp.heads.conformal import coverage
    from clipexp.heads.metrics import accuracy, balanced_accuracy

    heads = inf.heads
    head = head or heads.names[0]
    inf.classify(torch.zeros(0, inf.embed_dim), head, alpha)  # an unknown head or a bad alpha: before any image is read
    names = list(heads.class_names)
    with _progress(len(paths), progress, f"classify ({head})") as bar:
        embeds, errors = inf.embed_sources(paths, progress=bar)
    ok = [i for i, e in enumerate(errors) if e is None]
    pred = inf.classify(embeds[ok] if ok else torch.zeros(0, inf.embed_dim), head, alpha)
    records = pred.records()
    sets = [None if r["set"] is None else "|".join(r["set"]) for r in records]
    rows = _rows(paths, labels, errors, ok, names, pred.probabilities,
                 {"prediction": [r["prediction"] for r in records], "probability": [r["probability"] for r in records], "set": sets})
    summary = {"images": len(paths), "answered": len(ok), "errors": len(paths) - len(ok), "head": head, "alpha": pred.alpha}
    if labels is not None:
        keep = _scored(labels, ok, names)
        if keep:
            at = {row: j for j, row in enumerate(ok)}
            rows_ok = torch.tensor([at[i] for i in keep])
            y = torch.tensor([names.index(labels[i]) for i in keep])
            p, top = pred.probabilities[rows_ok], pred.prediction[rows_ok]
            summary.update(labelled=len(keep), acc=accuracy(top, y), balanced_acc=balanced_accuracy(top, y, len(names)),
                           ece=expected_calibration_error(p.double(), y))
            if pred.sets is not None:
                summary["coverage"], _, summary["set_size"] = coverage(pred.sets[rows_ok], y, len(names))
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out, index=False)
    return summary


EXEMPLAR_HOLDOUT = 0.5  # share of each class's exemplars held out to calibrate (split_exemplars, seed 0)


def exemplar_heads(inf, folder: str, head: Optional[str], alpha: Optional[float], progress: bool):
    """Heads fitted on an exemplar bank: ``folder`` holds one sub-folder of images per class (classes the run may never
    have seen). Half of each class's images fit ``head`` (default prototype), the rest calibrate it (temperature,
    prediction sets at ``alpha``, default 0.1); a class with one image only fits. Returns the :class:`~clipexp.heads.HeadSet`."""
    import torch

    from clipexp.evaluate import class_text_embeddings
    from clipexp.heads import fit_heads, split_exemplars
    from clipexp.heads.heads import NEEDS_TEXT

    paths, labels = read_images(folder, "image_path", "label", flag="--exemplars")
    if labels is None or None in labels:
        loose = len(paths) if labels is None else labels.count(None)
        raise PredictError(f"--exemplars {folder}: {loose} image(s) directly in the folder; put each class's images in a "
                           "sub-folder named after the class (e.g. scratch/001.png)")
    names = sorted(set(labels))
    if len(names) < 2:
        raise PredictError(f"--exemplars {folder}: one class ({names[0]}); give a sub-folder of images for each of at least two classes")
    with _progress(len(paths), progress, "exemplars") as bar:
        embeds, errors = inf.embed_sources(paths, progress=bar)
    bad = [(p, e) for p, e in zip(paths, errors) if e is not None]
    if bad:
        raise PredictError(f"--exemplars {folder}: {bad[0][1]} ({len(bad)} exemplars unreadable): remove or replace them")
    head = head or "prototype"
    y = torch.tensor([names.index(label) for label in labels])
    fit, cal = split_exemplars(y, EXEMPLAR_HOLDOUT, seed=0)
    text = class_text_embeddings(inf.encode_texts, names, list(inf.spec.prompt_templates)) if head in NEEDS_TEXT else None
    return fit_heads((embeds[fit], y[fit]), (embeds[cal], y[cal]), names, heads=[head], class_text_embeds=text,
                     logit_scale=1.0 / inf.spec.temperature, alpha=0.1 if alpha is None else alpha)


def embed(inf, paths: List[str], out: Path, progress: bool) -> dict:
    """Embeddings to ``.parquet`` (path, embedding, error; the model's fingerprint in the file's metadata),
    ``.csv`` (path, error, model_fingerprint, e0 .. e<D-1>) or ``.npy`` (``[N, D]``, NaN rows for errors, paths
    in ``<out>.paths.txt``, the fingerprint in ``<out>.fingerprint``)."""
    with _progress(len(paths), progress, "embed") as bar:
        embeds, errors = inf.embed_sources(paths, progress=bar)
    if out.suffix not in EMBEDDING_SUFFIXES:
        raise PredictError(f"--out {out}: use a .parquet, .csv or .npy file")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_embeddings(out, paths, embeds, errors, inf.fingerprint)
    return {"images": len(paths), "answered": sum(e is None for e in errors), "errors": sum(e is not None for e in errors),
            "dim": int(embeds.shape[1])}


def search(inf, embeddings: Path, queries: Sequence[str], k: int, model: str = "<model>") -> List[dict]:
    """The ``k`` images most similar to each text query, from embeddings written by this same model (``model``:
    the ``--model`` the messages name)."""
    from clipexp.serving.inference import top_k

    found = read_embeddings(embeddings, model)
    redo = f"embed the images again with this model (embed --model {model} --out {embeddings})"
    if found.fingerprint is None:
        raise PredictError(f"--embeddings {embeddings} carries no model fingerprint (written by an older clipexp or another "
                           f"tool), so nothing says which model wrote it; {redo}")
    if found.fingerprint != inf.fingerprint:
        raise PredictError(f"--embeddings {embeddings} was written by another model (fingerprint {found.fingerprint[:12]}) than "
                           f"--model {model} ({inf.fingerprint[:12]}): its scores would rank wrongly; {redo}")
    paths, gallery = found.paths, found.vectors
    if gallery.shape[1] != inf.embed_dim:
        raise PredictError(f"--embeddings {embeddings}: vectors of size {gallery.shape[1]}, but this model embeds to {inf.embed_dim}; "
                           "embed the images with the same model")
    scores, index = top_k(inf.encode_texts(list(queries)), gallery, k)
    return [{"query": q, "rank": r + 1, "score": float(scores[qi, r]), "path": paths[int(index[qi, r])]}
            for qi, q in enumerate(queries) for r in range(index.shape[1])]


# --------------------------------------------------------------------------------------------- CLI
EXAMPLES = """examples:
  {prog} classify --model outputs/<date>/<time> --images test_split.csv --head linear --alpha 0.1 --out preds.csv
  {prog} classify --model runs:/<run id>/clip --images new/ --exemplars bank/ --head prototype --out preds.csv
  {prog} zero_shot --model outputs/<date>/<time> --images test.csv --out preds.csv
  {prog} embed --model runs:/<run id>/clip --images photos/ --out photos.parquet
  {prog} search --model <run id> --embeddings photos.parquet --query "a local defect" --top-k 5"""


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a miscoverage rate in (0, 1), e.g. 0.1 for sets that hold the class 90% of the time")
    return value


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Classify (with the run's heads), zero-shot classify, embed or search "
                                                          "images with a fine-tuned model.",
                                     epilog=EXAMPLES.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="{classify,zero_shot,embed,search}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="run id, runs:/ or models:/ URI, run folder, or save_pretrained folder")
    common.add_argument("--tracking-uri", default=None, help="MLflow store for run ids and URIs (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    common.add_argument("--batch-size", type=int, default=None, help="images per forward (default: the run's evaluation batch)")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    common.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    common.add_argument("--classes", default=None, help="comma-separated class names (replace the run's)")
    common.add_argument("--templates", default=None, help="'|'-separated prompt templates with {} (replace the run's)")
    common.add_argument("--no-progress", action="store_true")
    helps = {"classify": "a head's calibrated probability and prediction set per image (the run's heads, or --exemplars)",
             "zero_shot": "the zero-shot class per image (prompts; probabilities at the run's temperature, no sets)",
             "embed": "image embeddings to .parquet or .npy"}
    for name in ("classify", "zero_shot", "embed"):
        p = sub.add_parser(name, parents=[common], help=helps[name])
        p.add_argument("--images", required=True, help="a folder of images or a CSV with an image_path column")
        p.add_argument("--image-column", default="image_path")
        p.add_argument("--label-column", default="label")
        p.add_argument("--out", required=True, type=Path, help=".csv (classify, zero_shot); .parquet, .csv or .npy (embed)")
        if name == "classify":
            p.add_argument("--head", default=None, choices=list(HEADS), help="default: the run's first head (prototype with --exemplars)")
            p.add_argument("--alpha", type=_alpha, default=None,
                           help="miscoverage of the prediction sets, in (0, 1) (default: the run's eval.conformal.alpha)")
            p.add_argument("--exemplars", default=None, metavar="FOLDER",
                           help="fit the head on these images instead: one sub-folder per class (classes the run never saw)")
    p = sub.add_parser("search", parents=[common], help="top-k images for text queries, from embed's output")
    p.add_argument("--embeddings", required=True, type=Path, help="embed's output (.parquet, .csv or .npy) of this same model")
    p.add_argument("--query", required=True, action="append", help="a text query (repeat for several)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="also write the hits to this CSV")
    return parser


def run(args: argparse.Namespace) -> None:
    from clipexp.serving.inference import CLIPInference

    with tempfile.TemporaryDirectory(prefix="clipexp-model-") as tmp:
        model_dir = resolve_model(args.model, args.tracking_uri, Path(tmp))
        inf = CLIPInference.from_pretrained(model_dir, device=args.device, precision=args.precision, batch_size=args.batch_size,
                                            class_names=args.classes.split(",") if args.classes else None,
                                            prompt_templates=args.templates.split("|") if args.templates else None)
    progress = not args.no_progress
    if args.task == "search":
        hits = search(inf, args.embeddings, args.query, args.top_k, args.model)
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['path']}   [{h['query']}]")
        if args.out:
            import pandas as pd

            pd.DataFrame(hits).to_csv(args.out, index=False)
        return
    paths, labels = read_images(args.images, args.image_column, args.label_column)
    if args.task == "classify":
        if args.classes:
            raise PredictError("--classes: classify takes its classes from the run's heads, or from --exemplars' sub-folders")
        if args.exemplars:
            inf.heads = exemplar_heads(inf, args.exemplars, args.head, args.alpha, progress)
        s = classify(inf, paths, labels, args.out, progress, args.head, args.alpha)
        sets = f"sets at alpha {s['alpha']:g}" if s["alpha"] is not None else "no sets (no held-out exemplars to calibrate them)"
        print(f"{s['answered']} of {s['images']} images classified by head {s['head']} ({sets}; {s['errors']} unreadable: see the "
              f"error column) -> {args.out}")
        if "acc" in s:
            print(f"acc={s['acc']:.4f} balanced_acc={s['balanced_acc']:.4f} ece={s['ece']:.4f}"
                  + (f" coverage={s['coverage']:.4f} set_size={s['set_size']:.4f}" if "coverage" in s else "")
                  + f" over {s['labelled']} labelled images")
    elif args.task == "zero_shot":
        s = zero_shot(inf, paths, labels, args.out, progress)
        print(f"{s['answered']} of {s['images']} images classified ({s['errors']} unreadable: see the error column) -> {args.out}")
        if "zeroshot_acc" in s:
            print(f"zeroshot_acc={s['zeroshot_acc']:.4f} zeroshot_balanced_acc={s['zeroshot_balanced_acc']:.4f} "
                  f"over {s['labelled']} labelled images; confusion (rows true, columns predicted) -> {args.out.with_suffix('.confusion.csv')}")
            print(s["confusion"].to_string())
    else:
        s = embed(inf, paths, args.out, progress)
        print(f"{s['answered']} of {s['images']} images embedded ({s['dim']} dims; {s['errors']} unreadable) -> {args.out}")


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"{prog.split()[0]}: error: {err}", file=sys.stderr)
        return 2
    return 0
