"""Benchmark data made from the textile set: the same 2,000 images with captions that never repeat.

The textile set has one templated caption per class (3 distinct captions in 2,000 pairs), so caption
packing encodes 3 captions per batch instead of 64. :func:`write_unique_caption_csv` writes the same
images, classes and order with one caption per image: its number in the set, then the class caption
(``#0042 a textile fabric with a small local defect.``). The number comes first, so a tokenizer that
truncates at its context length keeps the captions distinct (clipexp's byte-level one: the longest
caption is 71 bytes + 2 special tokens, under 77).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Tuple, Union

CSV_COLUMNS = ("image_path", "caption", "label")


def textile_rows() -> List[Tuple[str, str, str]]:
    """``(absolute image path, class caption, class)`` of every textile image, in the order clipexp's
    textile source lists them (class folders in ``TEXTILE_CLASSES`` order, files sorted)."""
    from clipexp.data.textile import TEXTILE_CAPTIONS, TEXTILE_CLASSES, textile_root

    root = textile_root()
    return [(str(img.resolve()), TEXTILE_CAPTIONS[label], label)
            for sub, label in TEXTILE_CLASSES.items() for img in sorted((root / sub).glob("*.jpg"))]


def unique_caption(index: int, caption: str) -> str:
    return f"#{index:04d} {caption}"


def write_unique_caption_csv(path: Union[str, Path]) -> Path:
    """The textile set as a CSV (``image_path,caption,label``, absolute paths: read it with
    ``data.allow_outside_root=true``) whose captions are all distinct. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(CSV_COLUMNS)
        for i, (image, caption, label) in enumerate(textile_rows()):
            out.writerow((image, unique_caption(i, caption), label))
    return path
