"""Sources -> ``list[ImageTextPair]``: CSV, JSON, a folder, a Hugging Face dataset, the textile set.

Every ``DatasetLoader.from_*`` checks all rows (see :mod:`clipexp.data.validation`) and takes these
keywords besides its own:

``on_error``            ``"raise"`` (default): one :class:`DataValidationError` listing every problem;
                        ``"skip"``: drop bad rows, log them, return the rest.
``check_images``        fully decode every image (default True); False checks only that files exist.
``cache``               an :class:`~clipexp.data.ImageCache`: images decoded for checking are resized
                        and stored in it, so validation also warms the cache.
``allow_outside_root``  accept image paths outside the dataset root (default False).
``max_samples``         keep a seeded, label-stratified subset of this many rows (``seed``) before the
                        images are checked.

Relative image paths resolve against the folder of the CSV/JSON file (the *dataset root*).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from clipexp.data.pairs import IMAGE_EXTENSIONS, ImageTextPair
from clipexp.data.validation import (
    Candidate,
    DataValidationError,
    Problem,
    check_on_error,
    clean_captions,
    finalize,
    is_inside,
    resolve_image,
)

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Result = Tuple[List[ImageTextPair], List[Problem]]

JSON_IMAGE_KEYS = ("image", "image_path", "file_name", "filename", "path")
JSON_CAPTION_KEYS = ("captions", "caption", "text")


def _fail(source: PathLike, where: str, message: str) -> DataValidationError:
    return DataValidationError.from_problems(source, [Problem(where, message)], hint=False)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise _fail(path, str(path), "file not found" if not path.exists() else "not a file")


def _finish(cands: List[Candidate], source: PathLike, root: Optional[PathLike], opts: Mapping[str, Any], **kw: Any) -> Result:
    return finalize(
        cands,
        source,
        opts.get("on_error", "raise"),
        root=root,
        allow_outside_root=bool(opts.get("allow_outside_root", False)),
        check=bool(opts.get("check_images", True)),
        cache=opts.get("cache"),
        max_samples=opts.get("max_samples"),
        seed=int(opts.get("seed", 0) or 0),
        **kw,
    )


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------


def read_csv(
    path: PathLike,
    image_column: str = "image_path",
    caption_column: str = "caption",
    label_column: Optional[str] = "label",
    **opts: Any,
) -> Result:
    """CSV (``.tsv``: tab-separated) with a header row. Rows are reported by line (header = line 1)."""
    path = Path(path)
    _require_file(path)
    check_on_error(opts.get("on_error", "raise"))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    cands: List[Candidate] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise _fail(path, f"{path}:1", f"unreadable CSV header ({err})") from None
        if not header:
            raise _fail(path, f"{path}:1", "empty file: expected a header row with columns "
                        f"'{image_column}' and '{caption_column}'")
        header = [h.strip() for h in header]
        missing = [c for c in (image_column, caption_column) if c not in header]
        if missing:
            problems = [Problem(f"{path}:1", f"missing column '{c}' (columns: {', '.join(header)})") for c in missing]
            raise DataValidationError.from_problems(path, problems, hint=False)
        ii, ci = header.index(image_column), header.index(caption_column)
        li = header.index(label_column) if label_column and label_column in header else None
        prev = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise _fail(path, f"{path}:{reader.line_num}", f"unreadable CSV ({err})") from None
            line, prev = prev + 1, reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            cell = lambda i: row[i] if i is not None and i < len(row) else ""  # noqa: E731
            raw = cell(ii).strip()
            caps, empty = clean_captions([cell(ci)])
            c = Candidate(line, f"{path}:{line}", raw or None, resolve_image(raw, path.parent) if raw else None, caps,
                          cell(li).strip() or None)
            if not raw:
                c.problems.append(f"empty {image_column}")
            if empty:
                c.problems.append("empty caption")
            cands.append(c)
    return _finish(cands, path, path.parent, opts)


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def json_items_with_lines(text: str) -> Tuple[List[Tuple[Any, int]], Any]:
    """Parse a JSON list (or ``{"data": [...]}``) and return ``([(item, line), ...], whole)``.

    ``line`` is the 1-based line where each item starts. Raises ``json.JSONDecodeError`` /
    ``ValueError`` for invalid JSON or another top-level shape.
    """
    whole = json.loads(text)
    dec = json.JSONDecoder()
    if isinstance(whole, list):
        pos = _skip_ws(text, 0)
    elif isinstance(whole, dict) and isinstance(whole.get("data"), list):
        i = _skip_ws(text, 0) + 1
        pos = -1
        while True:
            i = _skip_ws(text, i)
            if text[i] == "}":
                break
            key, i = json.decoder.scanstring(text, i + 1)
            i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
            if key == "data":
                pos = i
            _, i = dec.raw_decode(text, i)
            i = _skip_ws(text, i)
            if text[i] == ",":
                i += 1
    else:
        raise ValueError('expected a list of {"image": ..., "caption": ...} objects, or {"data": [...]}')
    items: List[Tuple[Any, int]] = []
    i, line, last = pos + 1, 1 + text.count("\n", 0, pos), pos
    while True:
        i = _skip_ws(text, i)
        if text[i] == "]":
            break
        line += text.count("\n", last, i)
        last = i
        obj, i = dec.raw_decode(text, i)
        items.append((obj, line))
        i = _skip_ws(text, i)
        if text[i] == ",":
            i += 1
    return items, whole


def read_json(
    path: PathLike,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    label_column: Optional[str] = "label",
    **opts: Any,
) -> Result:
    """JSON list of objects (or ``{"data": [...]}``); each item reported by the line it starts on.

    Keys: the image under ``image_column`` or the first of ``image``, ``image_path``, ``file_name``,
    ``filename``, ``path``; the caption(s) under ``caption_column`` or ``captions`` (a list),
    ``caption``, ``text``; an optional ``label_column`` (``label``).
    """
    path = Path(path)
    _require_file(path)
    check_on_error(opts.get("on_error", "raise"))
    text = path.read_text(encoding="utf-8-sig")
    try:
        items, _ = json_items_with_lines(text)
    except json.JSONDecodeError as err:
        raise _fail(path, f"{path}:{err.lineno}", f"invalid JSON ({err.msg}, column {err.colno})") from None
    except ValueError as err:
        raise _fail(path, str(path), str(err)) from None
    image_keys = tuple(dict.fromkeys(([image_column] if image_column else []) + list(JSON_IMAGE_KEYS)))
    caption_keys = tuple(dict.fromkeys(([caption_column] if caption_column else []) + list(JSON_CAPTION_KEYS)))
    cands: List[Candidate] = []
    for n, (obj, line) in enumerate(items):
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            cands.append(Candidate(n, where, None, None, [], None,
                                   [f'expected an object like {{"image": ..., "caption": ...}}, got {type(obj).__name__}']))
            continue
        c = Candidate(n, where, None, None, [], None)
        ikey = next((k for k in image_keys if k in obj), None)
        raw = obj.get(ikey) if ikey else None
        if ikey is None:
            c.problems.append(f"missing key '{image_keys[0]}'")
        elif not isinstance(raw, str) or not raw.strip():
            c.problems.append(f"empty {ikey}" if not raw else f"'{ikey}' must be a path string")
        else:
            c.raw_image = raw.strip()
            c.image_path = resolve_image(c.raw_image, path.parent)
        ckey = next((k for k in caption_keys if k in obj), None)
        if ckey is None:
            c.problems.append(f"missing key '{'caption' if caption_column is None else caption_column}'")
        else:
            value = obj[ckey]
            caps, empty = clean_captions(value if isinstance(value, list) else [value])
            c.captions = caps
            if empty:
                c.problems.append("empty caption")
        lab = obj.get(label_column) if label_column else None
        c.label = None if lab is None or str(lab).strip() == "" else str(lab).strip()
        cands.append(c)
    return _finish(cands, path, path.parent, opts)


# --------------------------------------------------------------------------------------------------
# A folder
# --------------------------------------------------------------------------------------------------


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def read_directory(path: PathLike, prompt_templates: Optional[Sequence[str]] = None, **opts: Any) -> Result:
    """A folder in one of three layouts, tried in this order:

    1. ``captions.txt``: one ``name<TAB>caption[<TAB>label]`` per line (name relative to the folder;
       a name on several lines gets several captions);
    2. one ``<image stem>.txt`` per image (each non-empty line is a caption);
    3. class sub-folders ``root/<label>/*.jpg`` (searched recursively): label = folder name, caption =
       ``prompt_templates[0].format(label)`` (default ``"a photo of {}."``).
    """
    root = Path(path).absolute()
    if not root.is_dir():
        raise _fail(root, str(root), "folder not found" if not root.exists() else "not a folder")
    check_on_error(opts.get("on_error", "raise"))
    cands: List[Candidate] = []
    captions_file = root / "captions.txt"
    images = sorted(p for p in root.iterdir() if _is_image(p))
    if captions_file.is_file():
        by_name: Dict[str, Candidate] = {}
        for line_no, line in enumerate(captions_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{captions_file}:{line_no}"
            parts = line.split("\t")
            if len(parts) < 2:
                cands.append(Candidate(line_no, where, None, None, [], None, ["expected 'image name<TAB>caption'"]))
                continue
            name = parts[0].strip()
            caps, empty = clean_captions([parts[1]])
            label = parts[2].strip() or None if len(parts) > 2 else None
            if not name:
                cands.append(Candidate(line_no, where, None, None, [], None, ["empty image name"]))
                continue
            if name in by_name and not empty:
                by_name[name].captions += caps
                continue
            c = Candidate(line_no, where, name, resolve_image(name, root), caps, label)
            if empty:
                c.problems.append("empty caption")
            by_name.setdefault(name, c)
            cands.append(c)
        return _finish(cands, captions_file, root, opts)
    txt_images = [p for p in images if p.with_suffix(".txt").is_file()]
    if txt_images:
        for n, img in enumerate(images):
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                cands.append(Candidate(n, str(img), img.name, img, [], None, [f"no caption file '{txt.name}'"]))
                continue
            caps, _ = clean_captions([line for line in txt.read_text(encoding="utf-8-sig").splitlines() if line.strip()] or [""])
            c = Candidate(n, str(txt), img.name, img, caps, None)
            if not caps:
                c.problems.append("empty caption")
            cands.append(c)
        return _finish(cands, root, root, opts)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    template = (list(prompt_templates) if prompt_templates else ["a photo of {}."])[0]
    n = 0
    for d in classes:
        for img in sorted(p for p in d.rglob("*") if _is_image(p)):
            rel = str(img.relative_to(root))
            cands.append(Candidate(n, str(img), rel, img, [template.format(d.name)], d.name))
            n += 1
    if not cands:
        raise _fail(root, str(root), "no captions.txt, no per-image .txt caption files, and no class sub-folders "
                    f"with images ({', '.join(IMAGE_EXTENSIONS)})")
    return _finish(cands, root, root, opts)


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------------


def _image_ext(data: bytes, fallback: str = ".img") -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if data[:2] == b"BM":
        return ".bmp"
    return fallback


def read_hf(
    path_or_name: PathLike,
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: Optional[str] = None,
    split: str = "train",
    cache_dir: Optional[PathLike] = None,
    **opts: Any,
) -> Result:
    """A ``datasets`` dataset: a ``save_to_disk`` folder (``load_from_disk``; a DatasetDict picks
    ``split``) or a hub name (``load_dataset(name, split=split)``, needs a network or the HF cache).

    Images stored in the dataset (an ``Image`` column, or raw bytes) are written once, byte for byte,
    to ``<cache_dir>/hf/<dataset fingerprint>/<sha1>.<ext>`` (``cache_dir`` default ``./.clipexp_cache``),
    so the rest of the pipeline works on files; string columns are paths, relative to the saved
    dataset's folder. Captions may be strings or lists of strings; a ``ClassLabel`` label gives its
    names. Rows are reported as ``<dataset>[<split>]:<row index>``.
    """
    import datasets

    from clipexp.data.cache import default_cache_dir

    check_on_error(opts.get("on_error", "raise"))
    local = Path(os.path.expanduser(str(path_or_name)))
    if local.exists():
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as err:  # noqa: BLE001 - datasets raises several types
            raise _fail(local, str(local), f"not a dataset saved with save_to_disk ({str(err).splitlines()[0]})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise _fail(local, str(local), f"no split '{split}' (splits: {', '.join(ds)}); set hf_split")
            ds = ds[split]
        base: Optional[Path] = local
    else:
        try:
            ds = datasets.load_dataset(str(path_or_name), split=split)
        except Exception as err:  # noqa: BLE001
            raise _fail(path_or_name, str(path_or_name),
                        f"cannot load this dataset: not a local folder, and the hub failed ({str(err).splitlines()[0]})") from None
        base = None
    source = f"{path_or_name}[{split}]"
    missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
    if missing:
        raise DataValidationError.from_problems(
            source, [Problem(source, f"missing column '{c}' (columns: {', '.join(ds.column_names)})") for c in missing], hint=False)
    if label_column and label_column not in ds.column_names:
        label_column = None
    features = ds.features
    if isinstance(features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    label_names = None
    if label_column and isinstance(features[label_column], datasets.ClassLabel):
        label_names = features[label_column].names
    out_dir = Path(cache_dir or default_cache_dir()).absolute() / "hf" / (getattr(ds, "_fingerprint", None) or hashlib.sha1(source.encode()).hexdigest()[:16])
    columns = [c for c in (image_column, caption_column, label_column) if c]
    cands: List[Candidate] = []
    wrote = 0
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=256):
        for k in range(len(batch[image_column])):
            where = f"{source}:{row}"
            value = batch[image_column][k]
            c = Candidate(row, where, None, None, [], None)
            if isinstance(value, dict):
                data, p = value.get("bytes"), value.get("path")
            elif isinstance(value, (bytes, bytearray)):
                data, p = value, None
            else:
                data, p = None, value
            if data is not None:
                name = hashlib.sha1(data).hexdigest() + _image_ext(bytes(data[:16]), Path(p).suffix.lower() if p else ".img")
                target = out_dir / name
                if not target.is_file():
                    out_dir.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f"{name}.{os.getpid()}.tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                    wrote += 1
                c.raw_image, c.image_path = str(target), target
            elif p:
                c.raw_image = str(p)
                c.image_path = resolve_image(str(p), base or Path.cwd())
                if base is not None and not opts.get("allow_outside_root") and not is_inside(base, c.image_path):
                    c.problems.append(f"image '{p}' is outside the dataset root {os.path.abspath(base)}")
                    c.image_path = None
            else:
                c.problems.append(f"empty {image_column}")
            cap = batch[caption_column][k]
            caps, empty = clean_captions(cap if isinstance(cap, list) else [cap])
            c.captions = caps
            if empty:
                c.problems.append("empty caption")
            if label_column:
                lab = batch[label_column][k]
                if label_names is not None and isinstance(lab, int) and 0 <= lab < len(label_names):
                    lab = label_names[lab]
                c.label = None if lab is None or str(lab).strip() == "" else str(lab)
            cands.append(c)
            row += 1
    if wrote:
        log.info("wrote %d images of %s to %s", wrote, source, out_dir)
    # string paths were checked against the saved dataset's folder above; embedded images live in out_dir
    return _finish(cands, source, None, opts)


# --------------------------------------------------------------------------------------------------
# The front door
# --------------------------------------------------------------------------------------------------


class DatasetLoader:
    """Load ``list[ImageTextPair]`` from a source (see module doc for the common keywords)."""

    @staticmethod
    def from_csv(path: PathLike, image_column: str = "image_path", caption_column: str = "caption",
                 label_column: Optional[str] = "label", on_error: str = "raise", **opts: Any) -> List[ImageTextPair]:
        return read_csv(path, image_column, caption_column, label_column, on_error=on_error, **opts)[0]

    @staticmethod
    def from_json(path: PathLike, image_column: Optional[str] = None, caption_column: Optional[str] = None,
                  label_column: Optional[str] = "label", on_error: str = "raise", **opts: Any) -> List[ImageTextPair]:
        return read_json(path, image_column, caption_column, label_column, on_error=on_error, **opts)[0]

    @staticmethod
    def from_directory(path: PathLike, prompt_templates: Optional[Sequence[str]] = None, on_error: str = "raise",
                       **opts: Any) -> List[ImageTextPair]:
        return read_directory(path, prompt_templates, on_error=on_error, **opts)[0]

    @staticmethod
    def from_hf(path_or_name: PathLike, image_column: str = "image", caption_column: str = "caption",
                label_column: Optional[str] = None, split: str = "train", on_error: str = "raise",
                **opts: Any) -> List[ImageTextPair]:
        return read_hf(path_or_name, image_column, caption_column, label_column, split, on_error=on_error, **opts)[0]

    @staticmethod
    def from_textile(path: Optional[PathLike] = None, captions: Optional[Mapping[str, str]] = None,
                     on_error: str = "raise", **opts: Any) -> List[ImageTextPair]:
        from clipexp.data.textile import read_textile

        return read_textile(path, captions, on_error=on_error, **opts)[0]


def _opt(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``cfg[key]`` when the key is present (even when null), else ``default``; dicts, DictConfigs, objects."""
    try:
        return cfg.get(key, default)  # dict or DictConfig
    except AttributeError:
        return getattr(cfg, key, default)


def read_source(data_cfg: Mapping[str, Any], prompt_templates: Optional[Sequence[str]] = None, *, seed: int = 0,
                cache: Any = None) -> Result:
    """:func:`load_pairs` returning ``(pairs, problems)`` (the problems skipped under ``on_error=skip``)."""
    from clipexp.data.textile import read_textile

    source = _opt(data_cfg, "source", "textile")
    path = _opt(data_cfg, "path")
    opts = dict(
        on_error=_opt(data_cfg, "on_error") or "raise",
        max_samples=_opt(data_cfg, "max_samples"),
        allow_outside_root=bool(_opt(data_cfg, "allow_outside_root", False)),
        check_images=bool(_opt(data_cfg, "check_images", True)),
        cache=cache,
        seed=seed,
    )
    if source in ("csv", "json", "folder", "hf") and not path:
        raise ValueError(f"data.path is required for data.source={source}")
    if source == "csv":
        return read_csv(path, _opt(data_cfg, "image_column") or "image_path", _opt(data_cfg, "caption_column") or "caption",
                        _opt(data_cfg, "label_column", "label"), **opts)
    if source == "json":
        return read_json(path, _opt(data_cfg, "image_column"), _opt(data_cfg, "caption_column"),
                         _opt(data_cfg, "label_column", "label"), **opts)
    if source == "folder":
        return read_directory(path, prompt_templates, **opts)
    if source == "hf":
        return read_hf(path, _opt(data_cfg, "image_column") or "image", _opt(data_cfg, "caption_column") or "caption",
                       _opt(data_cfg, "label_column"), _opt(data_cfg, "hf_split") or "train",
                       cache_dir=_opt(data_cfg, "cache_dir"), **opts)
    if source == "textile":
        return read_textile(path, None, **opts)
    raise ValueError(f"data.source={source!r} is invalid: one of csv, json, folder, hf, textile")


def load_pairs(data_cfg: Mapping[str, Any], prompt_templates: Optional[Sequence[str]] = None, *, seed: int = 0,
               cache: Any = None) -> List[ImageTextPair]:
    """The trainer's factory: dispatch on ``data_cfg["source"]`` (keys of ``DataConfig``: source, path,
    image_column, caption_column, label_column, hf_split, max_samples, on_error)."""
    return read_source(data_cfg, prompt_templates, seed=seed, cache=cache)[0]
