"""A Hugging Face ``datasets`` source -> candidate rows (see :func:`read_hf`)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from clipexp.files import write_bytes
from clipexp.data.pairs import ImageTextPair
from clipexp.data.problems import DataValidationError, Problem, one_problem
from clipexp.data.validation import Candidate, check_on_error, clean_captions, finalize_with, outside_root, resolve_image

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Result = Tuple[List[ImageTextPair], List[Problem]]


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


def _open(path_or_name: PathLike, split: str) -> Tuple[Any, Optional[Path]]:
    """``(dataset, base folder for relative image paths or None)``: a saved folder, else the hub."""
    import datasets

    local = Path(os.path.expanduser(str(path_or_name)))
    if not local.exists():
        try:
            return datasets.load_dataset(str(path_or_name), split=split), None
        except Exception as err:  # noqa: BLE001 - datasets raises several types
            raise one_problem(path_or_name, str(path_or_name),
                        f"cannot load this dataset: not a local folder, and the hub failed ({str(err).splitlines()[0]})") from None
    try:
        ds = datasets.load_from_disk(str(local))
    except Exception as err:  # noqa: BLE001
        raise one_problem(local, str(local), f"not a dataset saved with save_to_disk ({str(err).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise one_problem(local, str(local), f"no split '{split}' (splits: {', '.join(ds)}); set hf_split")
        ds = ds[split]
    return ds, local


def _write_once(data: bytes, fallback_ext: str, out_dir: Path) -> Tuple[Path, bool]:
    """An embedded image as ``<out_dir>/<sha1><ext>`` (atomic write; ``fallback_ext`` when the bytes do not
    say the format); ``(path, whether it was written now)``."""
    name = hashlib.sha1(data).hexdigest() + _image_ext(bytes(data[:16]), fallback_ext)
    target = out_dir / name
    if target.is_file():
        return target, False
    write_bytes(target, bytes(data))
    return target, True


def _set_image(c: Candidate, value: Any, image_column: str, out_dir: Path, base: Optional[Path], outside_ok: bool) -> bool:
    """Fill ``c``'s image from one cell (bytes, ``{"bytes", "path"}`` or a path); True when a file was written."""
    if isinstance(value, dict):
        data, p = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, p = value, None
    else:
        data, p = None, value
    if data is not None:
        c.image_path, wrote = _write_once(data, Path(p).suffix.lower() if p else ".img", out_dir)
        c.raw_image = str(c.image_path)
        return wrote
    if p:
        c.raw_image = str(p)
        c.image_path = resolve_image(str(p), base or Path.cwd())
        outside = outside_root(base, c.image_path) if base is not None and not outside_ok else None
        if outside:
            c.problems.append(f"image '{p}' {outside}")
            c.image_path = None
    else:
        c.problems.append(f"empty {image_column}")
    return False


def _label(value: Any, names: Optional[Sequence[str]]) -> Optional[str]:
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        value = names[value]
    return None if value is None or str(value).strip() == "" else str(value)


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
    ds, base = _open(path_or_name, split)
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
    outside_ok = bool(opts.get("allow_outside_root", True))
    cands: List[Candidate] = []
    wrote = 0
    for batch in ds.select_columns(columns).iter(batch_size=256):
        for k in range(len(batch[image_column])):
            c = Candidate(len(cands), f"{source}:{len(cands)}", None, None, [], None)
            wrote += _set_image(c, batch[image_column][k], image_column, out_dir, base, outside_ok)
            cap = batch[caption_column][k]
            c.captions, empty = clean_captions(cap if isinstance(cap, list) else [cap])
            if empty:
                c.problems.append("empty caption")
            if label_column:
                c.label = _label(batch[label_column][k], label_names)
            cands.append(c)
    if wrote:
        log.info("wrote %d images of %s to %s", wrote, source, out_dir)
    # string paths were checked against the saved dataset's folder above; embedded images live in out_dir
    return finalize_with(cands, source, None, opts)
