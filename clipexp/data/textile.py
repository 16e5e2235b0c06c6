"""The textile inspection set: 2,000 real 250x250 JPEGs from the PyPI package ``conformal-clip-data``.

=============  ===========================  =====  ===================================================
folder         label (class name)           count  caption
=============  ===========================  =====  ===================================================
``nominal/``   ``nominal``                  1000   a close-up photo of defect-free textile fabric.
``local/``     ``local defect``             500    a textile fabric with a small local defect.
``global/``    ``global defect``            500    a textile fabric with a defect spread across the whole surface.
=============  ===========================  =====  ===================================================

The class names read naturally in the domain prompt templates for zero-shot evaluation ("an
industrial inspection image of local defect."). One caption per class means three caption groups:
every same-class pair is a positive for the loss and a correct answer for retrieval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from clipexp.data.problems import DataValidationError, Problem
from clipexp.data.validation import Candidate, check_on_error, finalize_with

#: sub-folder -> class name
TEXTILE_CLASSES: Dict[str, str] = {"nominal": "nominal", "local": "local defect", "global": "global defect"}
#: class name -> caption
TEXTILE_CAPTIONS: Dict[str, str] = {
    "nominal": "a close-up photo of defect-free textile fabric.",
    "local defect": "a textile fabric with a small local defect.",
    "global defect": "a textile fabric with a defect spread across the whole surface.",
}


def textile_root() -> Path:
    """The package's image folder (holding ``nominal/``, ``local/``, ``global/``)."""
    try:
        import conformal_clip_data
    except ImportError:
        raise ModuleNotFoundError(
            "data.source=textile needs the package conformal-clip-data: pip install conformal-clip-data"
        ) from None
    return Path(conformal_clip_data.textile_simulated_root())


def read_textile(path: Optional[Union[str, Path]] = None, captions: Optional[Mapping[str, str]] = None, **opts: Any):
    """Pairs of the textile set (``path``: a folder with the same three sub-folders; default: the package's).

    ``captions`` maps a class name to its caption (defaults: :data:`TEXTILE_CAPTIONS`).
    """
    check_on_error(opts.get("on_error", "raise"))
    root = Path(path).absolute() if path else textile_root()
    caps = {**TEXTILE_CAPTIONS, **(captions or {})}
    missing = [sub for sub in TEXTILE_CLASSES if not (root / sub).is_dir()]
    if missing:
        raise DataValidationError.from_problems(
            root, [Problem(str(root / sub), "class folder not found") for sub in missing], hint=False)
    cands: List[Candidate] = []
    for sub, label in TEXTILE_CLASSES.items():
        for img in sorted((root / sub).glob("*.jpg")):
            cands.append(Candidate(len(cands), str(img), f"{sub}/{img.name}", img, [caps[label]], label))
    return finalize_with(cands, root, root, opts)
