"""Any clipexp source -> WebDataset shards + ``manifest.json``: ``clipexp shards SOURCE OUT/``.

The source is read and checked exactly as training reads it (:func:`clipexp.data.loaders.read_source`:
every image decoded once, bad rows raised or, with ``--on-error skip``, dropped), split as training
splits it (``--split`` and ``--seed``, the defaults of ``data.train_split/val_split/test_split`` and
``seed``), and each split written in order as ``OUT/<split>-NNNNNN.tar``. A sample is

    <id>.<ext>    the image file's bytes as they are (no re-encoding: decoding gives the same pixels)
    <id>.txt      the first caption
    <id>.json     {"caption", "captions", "label", "index", "source"}

``manifest.json`` lists each split's shards with their sample counts and first sample ids, the class
names and the brace pattern to pass as ``data.urls`` / ``data.val_urls`` / ``data.test_urls``.

Examples::

    clipexp shards /data/pairs.csv /data/shards/             # csv (the default source)
    clipexp shards textile /data/textile_shards/ --shard-size 200
    clipexp shards /data/pairs.json /data/shards/ --source json --split 1,0,0
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from clipexp.files import atomic_write
from clipexp.data.pairs import ImageTextPair, class_names_of
from clipexp.data.shards import FORMAT, MANIFEST

SPLIT_NAMES = ("train", "val", "test")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_split(pairs: Sequence[ImageTextPair], out: Path, split: str, shard_size: int, first_index: int = 0) -> List[Dict[str, Any]]:
    """Write ``pairs`` as ``out/<split>-NNNNNN.tar`` shards of ``shard_size`` samples (the last may be
    smaller); returns the manifest entries ``{"name", "count", "first_index"}``."""
    shards = []
    for k, start in enumerate(range(0, len(pairs), shard_size)):
        chunk = pairs[start:start + shard_size]
        name = f"{split}-{k:06d}.tar"
        def write(tmp: Path, chunk=chunk, start=start) -> None:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for j, pair in enumerate(chunk):
                    index = first_index + start + j
                    key = f"{index:09d}"
                    ext = Path(pair.image_path).suffix.lower().lstrip(".") or "jpg"
                    ext = {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)
                    _add(tar, f"{key}.{ext}", Path(pair.image_path).read_bytes())
                    _add(tar, f"{key}.txt", pair.captions[0].encode())
                    meta = {"caption": pair.captions[0], "captions": list(pair.captions), "label": pair.label, "index": index,
                            "source": pair.source}
                    _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())

        atomic_write(out / name, write)
        shards.append({"name": name, "count": len(chunk), "first_index": first_index + start})
    return shards


def to_shards(data_cfg: Dict[str, Any], out: Path, *, shard_size: int = 1000, seed: int = 42,
              split: Sequence[float] = (0.8, 0.1, 0.1)) -> Dict[str, Any]:
    """Read ``data_cfg`` (the keys of ``data``: source, path, columns, on_error, max_samples, ...), split it
    with ``split`` and ``seed`` as training does, write the shards and ``manifest.json`` into ``out``;
    returns the manifest."""
    from clipexp.data.loaders import read_source
    from clipexp.data.split import check_split_sizes, split_pairs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, problems = read_source(data_cfg, seed=seed)
    parts = split_pairs(pairs, *split, seed)
    check_split_sizes(pairs, parts, list(split))
    manifest: Dict[str, Any] = {"format": FORMAT, "created_by": "clipexp shards", "source": dict(data_cfg),
                                "seed": seed, "split": list(split), "class_names": class_names_of(pairs),
                                "skipped_rows": [str(p) for p in problems], "splits": {}}
    first = 0
    for name, part in zip(SPLIT_NAMES, parts):
        if not part:
            continue
        shards = write_split(part, out, name, shard_size, first)
        first += len(part)
        last = len(shards) - 1
        pattern = str(out.resolve() / (f"{name}-{{000000..{last:06d}}}.tar" if last else f"{name}-000000.tar"))
        manifest["splits"][name] = {"urls": pattern, "count": len(part), "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def main(argv: Optional[Sequence[str]] = None, prog: str = "clipexp shards") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"examples:\n  {prog} /data/pairs.csv /data/shards/\n  {prog} textile /data/textile_shards/ --shard-size 200\n"
                                        f"  {prog} /data/pairs.json /data/shards/ --source json --split 1,0,0")
    ap.add_argument("path", help="the source: a CSV / JSON file, a folder, a saved HF dataset, or 'textile'")
    ap.add_argument("out", help="output folder for the shards and manifest.json")
    ap.add_argument("--source", default=None, help="csv | json | folder | hf | textile (default: from the path)")
    ap.add_argument("--image-column", default=None)
    ap.add_argument("--caption-column", default=None)
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--allow-outside-root", action=argparse.BooleanOptionalAction, default=True,
                    help="read image paths outside the CSV/JSON's folder (default; --no-allow-outside-root refuses them)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    ap.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test shares (default 0.8,0.1,0.1, as data.*_split)")
    ap.add_argument("--seed", type=int, default=42, help="the split's seed (default 42, as the run config's seed)")
    args = ap.parse_args(argv)
    source = args.source or ("textile" if args.path == "textile" else "json" if args.path.endswith(".json") else
                             "folder" if Path(args.path).is_dir() and not (Path(args.path) / "dataset_info.json").is_file() else
                             "hf" if Path(args.path).is_dir() else "csv")
    cfg = {"source": source, "path": None if source == "textile" else args.path, "on_error": args.on_error,
           "max_samples": args.max_samples, "allow_outside_root": args.allow_outside_root, "label_column": args.label_column or None}
    if args.image_column:
        cfg["image_column"] = args.image_column
    if args.caption_column:
        cfg["caption_column"] = args.caption_column
    from clipexp.errors import UserError

    try:
        split = [float(x) for x in args.split.split(",")]
        if len(split) != 3 or abs(sum(split) - 1) > 1e-6:
            raise ValueError(f"--split={args.split!r} is invalid: three shares summing to 1, e.g. 0.8,0.1,0.1")
        manifest = to_shards(cfg, Path(args.out), shard_size=args.shard_size, seed=args.seed, split=split)
    except (UserError, ValueError, OSError) as err:
        print(f"clipexp: error: {err}", file=sys.stderr)
        return 2
    for name, s in manifest["splits"].items():
        print(f"{name}: {s['count']} samples in {len(s['shards'])} shards: data.{'urls' if name == 'train' else name + '_urls'}='{s['urls']}'")
    print(f"manifest: {Path(args.out) / MANIFEST}")
    return 0

