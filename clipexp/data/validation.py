"""Check every row of a source before training and report all problems at once.

Each source (csv, json, folder, hf, textile) parses its rows into :class:`Candidate` records, noting
row-level problems (empty caption, missing key, bad line) as it goes; :func:`finalize` then checks the
paths (inside the dataset root?) and the images themselves (every image fully decoded, in a thread
pool, each distinct file once) and either raises one :class:`DataValidationError` listing every
problem, or (``on_error="skip"``) drops the bad rows, logs them, and returns the rest.

The report users see::

    3 problems in /data/pairs.csv (fix these rows, or set on_error="skip" / data.on_error=skip to drop them)
      /data/pairs.csv:3: image 'missing.jpg' not found
      /data/pairs.csv:4: empty caption
      /data/pairs.csv:6: image 'broken.jpg' is truncated or corrupt (image file is truncated)

*Dataset root*: the folder of the CSV/JSON file, the folder given to ``from_directory``, the saved
HF dataset's folder (or the folder its images were written to), the textile package's image folder.
Image paths may leave it by default (``allow_outside_root=True``): the common layout lists ``/data/images/...``
from a CSV in a project folder, and a user's own CSV is no trust boundary (the served model is: it reads
only under ``tracking.serve_file_root``). With ``allow_outside_root=False`` an image path that leaves it
(``../x.jpg``, an absolute path elsewhere, or a symlink inside the root whose target lies outside it) is a
problem naming the key; a symlink whose target stays inside the root is fine.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from clipexp.data.images import ImageDecodeError, decode_image_file
from clipexp.data.pairs import ImageTextPair, assign_group_ids
from clipexp.data.problems import DataValidationError, Problem
from clipexp.data.split import stratified_assign

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
OUTSIDE_HINT = "; set data.allow_outside_root=true to read images outside it"


@dataclass
class Candidate:
    """A parsed row: enough to build a pair, plus the problems found while parsing it."""

    order: int
    where: str
    raw_image: Optional[str]
    image_path: Optional[Path]
    captions: List[str]
    label: Optional[str] = None
    problems: List[str] = field(default_factory=list)


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is invalid: one of raise, skip")
    return on_error


def clean_captions(raw: Sequence[object]) -> Tuple[List[str], bool]:
    """Strip captions; returns (non-empty captions, whether any was empty/missing)."""
    out, empty = [], False
    for c in raw:
        text = "" if c is None else str(c).strip()
        if text:
            out.append(text)
        else:
            empty = True
    return out, empty or not out


def is_inside(root: Union[str, Path], path: Union[str, Path]) -> bool:
    """Lexical containment: ``path`` (after resolving ``..``) lies under ``root``."""
    r = os.path.normpath(os.path.abspath(root))
    p = os.path.normpath(os.path.abspath(path))
    try:
        return os.path.commonpath([r, p]) == r
    except ValueError:  # different drives (Windows)
        return False


def outside_root(root: Union[str, Path], path: Union[str, Path]) -> Optional[str]:
    """Why ``path`` lies outside the dataset ``root`` (completing "image 'x' ..."), or None when inside:
    lexically (``..``, an absolute path elsewhere), or through a symlink (of the file or of a folder on
    its way) whose target leaves the root."""
    if not is_inside(root, path):
        return f"is outside the dataset root {os.path.abspath(root)}{OUTSIDE_HINT}"
    real = os.path.realpath(path)
    if not is_inside(os.path.realpath(root), real):
        return f"is a symlink to {real}, outside the dataset root {os.path.abspath(root)}{OUTSIDE_HINT}"
    return None


def resolve_image(raw: str, base: Union[str, Path]) -> Path:
    """An image path as written in a source, resolved against the source's folder (made absolute)."""
    p = Path(os.path.expanduser(raw))
    return Path(os.path.abspath(p if p.is_absolute() else Path(base) / p))  # absolute, ".." resolved


def check_images(
    paths: Sequence[Path],
    loader: Optional[Callable[[Path], object]] = None,
    threads: Optional[int] = None,
) -> Dict[Path, str]:
    """Fully decode each distinct path (``loader`` defaults to a plain decode; an
    :class:`~clipexp.data.ImageCache`'s ``get`` fills the cache at the same time).

    Returns ``{path: reason}`` for the images that failed.
    """
    loader = loader or decode_image_file
    unique = list(dict.fromkeys(paths))
    threads = threads or min(8, os.cpu_count() or 1)

    def one(p: Path) -> Optional[str]:
        try:
            loader(p)
        except ImageDecodeError as err:
            return err.reason
        except DataValidationError as err:  # raised by a cache wrapper
            return str(err)
        return None

    import torch

    intra = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over files, not inside each small resize
    try:
        if threads <= 1 or len(unique) < 16:
            results = [one(p) for p in unique]
        else:
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(one, unique, chunksize=16))
    finally:
        torch.set_num_threads(intra)
    return {p: r for p, r in zip(unique, results) if r is not None}


def subsample(cands: List[Candidate], n: int, seed: int) -> List[Candidate]:
    """A seeded, label-stratified subset of ``n`` candidates, in their original order."""
    if n >= len(cands):
        return cands
    keep_share = n / len(cands)
    assign = stratified_assign([c.label for c in cands], [keep_share, 1 - keep_share], seed, total_first=n)
    return [c for c, a in zip(cands, assign) if a == 0]


def finalize_with(cands: List[Candidate], source: Union[str, Path], root: Optional[Union[str, Path]],
                  opts: Mapping[str, Any]) -> Tuple[List[ImageTextPair], List[Problem]]:
    """:func:`finalize` with the loaders' common keywords (``on_error``, ``allow_outside_root``,
    ``check_images``, ``cache``, ``max_samples``, ``seed``: see :mod:`clipexp.data.loaders`)."""
    return finalize(
        cands,
        source,
        opts.get("on_error", "raise"),
        root=root,
        allow_outside_root=bool(opts.get("allow_outside_root", True)),
        check=bool(opts.get("check_images", True)),
        cache=opts.get("cache"),
        max_samples=opts.get("max_samples"),
        seed=int(opts.get("seed", 0) or 0),
    )


def finalize(
    cands: List[Candidate],
    source: Union[str, Path],
    on_error: str = "raise",
    *,
    root: Optional[Union[str, Path]] = None,
    allow_outside_root: bool = True,
    check: bool = True,
    cache: Optional[object] = None,
    max_samples: Optional[int] = None,
    seed: int = 0,
) -> Tuple[List[ImageTextPair], List[Problem]]:
    """Check candidates, then raise or drop the bad ones. Returns ``(pairs, problems)``.

    ``check=False`` skips decoding the images (existence is still checked). With a ``cache``
    (:class:`~clipexp.data.ImageCache`), ``auto`` is resolved for the selected images and the decoded
    images are stored in it while checking.
    """
    check_on_error(on_error)
    if max_samples is not None and max_samples < len(cands):
        cands = subsample(cands, int(max_samples), seed)
    problems: List[Problem] = []
    bad: Dict[int, bool] = {}

    def flag(c: Candidate, message: str) -> None:
        problems.append(Problem(c.where, message, c.order))
        bad[id(c)] = True

    to_check: List[Candidate] = []
    for c in cands:
        for message in c.problems:
            flag(c, message)
        if c.image_path is None:
            continue
        outside = outside_root(root, c.image_path) if root is not None and not allow_outside_root else None
        if outside:
            flag(c, f"image '{c.raw_image}' {outside}")
            continue
        to_check.append(c)
    failures = _image_failures([c.image_path for c in to_check], check, cache)
    for c in to_check:
        if c.image_path in failures:
            flag(c, f"image '{c.raw_image}' {failures[c.image_path]}")

    problems.sort(key=lambda p: p.order)
    pairs = [ImageTextPair(c.image_path, c.captions, c.label, -1, c.where) for c in cands
             if not bad.get(id(c)) and c.image_path is not None]
    _raise_or_log(problems, pairs, len(cands), source, on_error)
    return assign_group_ids(pairs), problems


def _image_failures(paths: List[Path], check: bool, cache: Optional[object]) -> Dict[Path, str]:
    """``{path: reason}`` of the images that cannot be used: decoded (into the ``cache`` when it is on),
    or with ``check=False`` only looked up."""
    loader = None
    if cache is not None:
        cache.prepare(paths)
        if cache.mode != "none":
            loader = cache.get
    if check:
        return check_images(paths, loader)
    return {p: "not found" for p in paths if not p.is_file()}


def _raise_or_log(problems: List[Problem], pairs: List[ImageTextPair], n_rows: int, source: Union[str, Path],
                  on_error: str) -> None:
    if problems:
        if on_error == "raise":
            raise DataValidationError.from_problems(source, problems)
        if not pairs:
            err = DataValidationError.from_problems(source, problems, hint=False)
            raise DataValidationError(f"{err}\nno usable rows are left in {source} after skipping these", problems, str(source))
        log.warning(
            "skipped %d of %d rows of %s (on_error=skip):\n%s",
            n_rows - len(pairs), n_rows, source, "\n".join(f"  {p}" for p in problems),
        )
    if not pairs:
        raise DataValidationError(f"no image-text pairs found in {source}", [], str(source))
