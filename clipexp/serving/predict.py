"""Batch tools for a fine-tuned model: ``python -m clipexp.serving.predict zero_shot | embed | search``.

::

    python -m clipexp.serving.predict zero_shot --model outputs/2026-12-02/10-00-00.000000 --images test.csv --out preds.csv
    python -m clipexp.serving.predict embed --model runs:/<run id>/clip --images photos/ --out photos.parquet
    python -m clipexp.serving.predict search --model <run id> --embeddings photos.parquet --query "a local defect" --top-k 5

``--model``: a run id or ``runs:/<id>/clip`` / ``models:/NAME/VERSION`` URI (``--tracking-uri``, default
the store rule of :func:`clipexp.tracking.tracker.default_tracking_uri`), a run folder (``outputs/...``, its ``model/``) or a ``save_pretrained`` folder (a
folder without ``clipexp_inference.json``, e.g. a hub model, needs ``--classes`` for zero_shot).
``--images``: a folder (searched recursively; a first-level subfolder named like a class is that image's
label) or a CSV with an ``image_path`` column (``--image-column``; relative paths are relative to the
CSV) and optionally ``label``. Images are prepared exactly as the trainer's evaluation prepares them
(:mod:`clipexp.serving.inference`), so on a run's test split ``zero_shot`` gives the run's test accuracy.
An image that cannot be read is reported on its row (``error``) and the others are still answered.
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

PROG = "clipexp.serving.predict"


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


def read_images(source: str, image_column: str, label_column: str) -> Tuple[List[str], Optional[List[Optional[str]]]]:
    """``--images`` (folder or CSV) -> (image paths, labels or None)."""
    from clipexp.data.pairs import IMAGE_EXTENSIONS

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise PredictError(f"--images {source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        labels = [p.relative_to(path).parts[0] if len(p.relative_to(path).parts) > 1 else None for p in files]
        return [str(p) for p in files], labels if any(labels) else None
    if path.suffix.lower() == ".csv" and path.is_file():
        import pandas as pd

        frame = pd.read_csv(path)
        if image_column not in frame.columns:
            raise PredictError(f"--images {source}: no column '{image_column}' (columns: {', '.join(frame.columns)}); set --image-column")
        paths = [str(p) if Path(str(p)).is_absolute() else str(path.parent / str(p)) for p in frame[image_column]]
        labels = None
        if label_column in frame.columns:
            labels = [None if pd.isna(v) else str(v) for v in frame[label_column]]
        return paths, labels
    raise PredictError(f"--images {source}: not a folder or a .csv file")


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
    rows = pd.DataFrame({"path": paths, "predicted_class": None, "probability": float("nan"), "error": errors})
    rows.loc[ok, "predicted_class"] = [names[int(p)] for p in preds]
    rows.loc[ok, "probability"] = probs.gather(1, preds[:, None])[:, 0].numpy() if ok else []
    for k, name in enumerate(names):
        rows[f"p({name})"] = float("nan")
        rows.loc[ok, f"p({name})"] = probs[:, k].numpy()
    summary = {"images": len(paths), "answered": len(ok), "errors": len(paths) - len(ok)}
    if labels is not None:
        rows.insert(1, "label", labels)
        index = {c: i for i, c in enumerate(names)}
        unknown = sorted({lab for lab in labels if lab is not None and lab not in index})
        if unknown:
            print(f"{PROG}: note: labels {unknown} are not among the model's classes {names}; those rows are not scored", file=sys.stderr)
        keep = [i for i in ok if labels[i] in index]
        if keep:
            m = zero_shot_metrics(embeds[keep], torch.tensor([index[labels[i]] for i in keep]), class_embeds)
            confusion = pd.DataFrame(m.pop("confusion").numpy(), index=[f"true {c}" for c in names], columns=[f"pred {c}" for c in names])
            confusion.to_csv(out.with_suffix(".confusion.csv"))
            summary.update(labelled=len(keep), **m)
            summary["confusion"] = confusion
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out, index=False)
    return summary


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
  {prog} zero_shot --model outputs/<date>/<time> --images test.csv --out preds.csv
  {prog} embed --model runs:/<run id>/clip --images photos/ --out photos.parquet
  {prog} search --model <run id> --embeddings photos.parquet --query "a local defect" --top-k 5"""


def build_parser(prog: str = f"python -m {PROG}") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Zero-shot classify, embed or search images with a fine-tuned model.",
                                     epilog=EXAMPLES.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="{zero_shot,embed,search}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="run id, runs:/ or models:/ URI, run folder, or save_pretrained folder")
    common.add_argument("--tracking-uri", default=None, help="MLflow store for run ids and URIs (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    common.add_argument("--batch-size", type=int, default=None, help="images per forward (default: the run's evaluation batch)")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    common.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    common.add_argument("--classes", default=None, help="comma-separated class names (replace the run's)")
    common.add_argument("--templates", default=None, help="'|'-separated prompt templates with {} (replace the run's)")
    common.add_argument("--no-progress", action="store_true")
    for name in ("zero_shot", "embed"):
        p = sub.add_parser(name, parents=[common], help=f"{name} over a folder or CSV of images")
        p.add_argument("--images", required=True, help="a folder of images or a CSV with an image_path column")
        p.add_argument("--image-column", default="image_path")
        p.add_argument("--label-column", default="label")
        p.add_argument("--out", required=True, type=Path, help=".csv (zero_shot); .parquet, .csv or .npy (embed)")
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
    if args.task == "zero_shot":
        s = zero_shot(inf, paths, labels, args.out, progress)
        print(f"{s['answered']} of {s['images']} images classified ({s['errors']} unreadable: see the error column) -> {args.out}")
        if "zeroshot_acc" in s:
            print(f"zeroshot_acc={s['zeroshot_acc']:.4f} zeroshot_balanced_acc={s['zeroshot_balanced_acc']:.4f} "
                  f"over {s['labelled']} labelled images; confusion (rows true, columns predicted) -> {args.out.with_suffix('.confusion.csv')}")
            print(s["confusion"].to_string())
    else:
        s = embed(inf, paths, args.out, progress)
        print(f"{s['answered']} of {s['images']} images embedded ({s['dim']} dims; {s['errors']} unreadable) -> {args.out}")


def main(argv: Optional[Sequence[str]] = None, prog: str = f"python -m {PROG}") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"{prog.split()[-1] if prog.startswith('python') else prog.split()[0]}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
