"""Sources -> ``list[ImageTextPair]``: CSV, JSON, a folder, a Hugging Face dataset, the textile set.

Every ``DatasetLoader.from_*`` checks all rows (see :mod:`clipexp.data.validation`) and takes these
keywords besides its own:

``on_error``            ``"raise"`` (default): one :class:`DataValidationError` listing every problem;
                        ``"skip"``: drop bad rows, log them, return the rest.
``check_images``        fully decode every image (default True); False checks only that files exist.
``cache``               an :class:`~clipexp.data.ImageCache`: images decoded for checking are resized
                        and stored in it, so validation also warms the cache.
``allow_outside_root``  accept image paths outside the dataset root (default True; False refuses them, e.g.
                        for a CSV from someone you do not trust).
``max_samples``         keep a seeded, label-stratified subset of this many rows (``seed``) before the
                        images are checked.

Relative image paths resolve against the folder of the CSV/JSON file (the *dataset root*).

The readers live with their formats: :mod:`clipexp.data.formats` (CSV, JSON, a folder),
:mod:`clipexp.data.hf` (Hugging Face datasets), :mod:`clipexp.data.textile` (the packaged set); this
module is the front door (``DatasetLoader``, and ``load_pairs`` for a ``DataConfig``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from clipexp.data.formats import read_csv, read_directory, read_json
from clipexp.data.hf import read_hf
from clipexp.data.pairs import ImageTextPair
from clipexp.data.problems import Problem
from clipexp.data.textile import read_textile

PathLike = Union[str, Path]
Result = Tuple[List[ImageTextPair], List[Problem]]

__all__ = ["DatasetLoader", "load_pairs", "read_source"]


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
    source = _opt(data_cfg, "source", "textile")
    path = _opt(data_cfg, "path")
    opts = dict(
        on_error=_opt(data_cfg, "on_error") or "raise",
        max_samples=_opt(data_cfg, "max_samples"),
        allow_outside_root=bool(_opt(data_cfg, "allow_outside_root", True)),
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
