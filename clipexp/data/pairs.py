"""The pair record every source produces, and caption groups.

An :class:`ImageTextPair` is one image file with one or more captions, an optional class label, the
id of its *caption group*, and where it came from (``file:line``) for error messages.

Caption groups
--------------
Domain data repeats captions ("a textile fabric with a small local defect." x 500). A contrastive
loss must not push such pairs apart and retrieval must count any of them as a correct answer, so
every pair carries a ``group_id``: two pairs with the same *normalised* caption share a group.
Normalisation lowercases, collapses runs of whitespace to one space, strips the ends and strips
trailing punctuation (``.,;:!?``), so ``"A cat."`` and ``"a  cat"`` are one group. A pair with several
captions takes the group of its **first** caption. Ids are dense (0, 1, 2, ...) in order of first
appearance in the loaded list, and are assigned once, over the whole source, before splitting, so
the same caption has the same id in train, val and test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_SPACES = re.compile(r"\s+")
_TRAILING_PUNCT = " \t\n.,;:!?"


@dataclass
class ImageTextPair:
    """One image file and its caption(s).

    ``captions`` is a non-empty list (the first caption is *the* caption; extra ones feed
    :class:`~clipexp.data.MultiCaptionCLIPDataset`). ``label`` is the class name or ``None``.
    ``group_id`` is the caption group (see module doc; ``-1`` = not assigned yet, datasets assign
    groups themselves then). ``source`` says where the pair came from, e.g. ``pairs.csv:7``.
    """

    image_path: Path
    captions: List[str]
    label: Optional[str] = None
    group_id: int = -1
    source: str = ""

    def __post_init__(self) -> None:
        self.image_path = Path(self.image_path)
        if isinstance(self.captions, str):
            self.captions = [self.captions]
        else:
            self.captions = list(self.captions)
        if self.label is not None and not isinstance(self.label, str):
            self.label = str(self.label)

    @property
    def caption(self) -> str:
        """The first (main) caption."""
        return self.captions[0]


def normalize_caption(caption: str) -> str:
    """Lowercase, collapse whitespace, strip trailing punctuation: the caption-group key."""
    return _SPACES.sub(" ", caption.lower()).strip().rstrip(_TRAILING_PUNCT)


def caption_group_ids(captions: Iterable[str]) -> List[int]:
    """Dense group ids (order of first appearance) of captions; equal normalised captions share one."""
    seen: Dict[str, int] = {}
    return [seen.setdefault(normalize_caption(c), len(seen)) for c in captions]


def assign_group_ids(pairs: Sequence[ImageTextPair]) -> List[ImageTextPair]:
    """Set every pair's ``group_id`` from its first caption (in place); returns the list."""
    for pair, gid in zip(pairs, caption_group_ids(p.captions[0] for p in pairs)):
        pair.group_id = gid
    return list(pairs)


def class_names_of(pairs: Iterable[ImageTextPair]) -> List[str]:
    """Sorted unique labels (``None`` excluded)."""
    return sorted({p.label for p in pairs if p.label is not None})


PathLike = Union[str, Path]
