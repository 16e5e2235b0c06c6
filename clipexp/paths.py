"""Where the project lives (the checkout or editable install root, its Hydra config tree ``conf/``), and
the sha256 manifests that let a reader tell a file is the one that was written.

* a checkpoint ``step_0000004.pt`` has ``step_0000004.pt.sha256`` beside it (:func:`write_checksum`);
* a saved model folder has ``SHA256SUMS`` listing every file in it (:func:`write_folder_manifest`).

Both are in ``sha256sum`` format (``<hex>  <name>``), so ``sha256sum -c`` checks them too, and each is
written to a temp file and renamed into place. A file without a manifest (written by an older clipexp)
is not checked.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Dict, Optional

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
CHECKSUM_SUFFIX = ".sha256"
FOLDER_MANIFEST = "SHA256SUMS"


def disk_full_error(err: Optional[BaseException]) -> Optional[OSError]:
    """The ``OSError`` of a full disk (ENOSPC / EDQUOT) in ``err`` or its causes, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        err = err.__cause__ or err.__context__
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    """``<file>.sha256``, the manifest of one file."""
    return Path(path).with_name(Path(path).name + CHECKSUM_SUFFIX)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_checksum(path: Path, digest: Optional[str] = None) -> Path:
    """Write ``<file>.sha256`` for ``path`` (``digest``: already computed, e.g. of the temp file renamed to ``path``)."""
    side = checksum_path(path)
    _atomic_write_text(side, f"{digest or sha256_file(path)}  {Path(path).name}\n")
    return side


def _read_manifest(path: Path) -> Dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if digest and name:
            out[name.lstrip("*")] = digest.strip().lower()
    return out


def checksum_problem(path: Path) -> Optional[str]:
    """None when ``path`` matches its ``.sha256`` manifest (or has none); else why not, in a few words."""
    side = checksum_path(path)
    if not side.is_file():
        return None
    expected = _read_manifest(side).get(Path(path).name)
    actual = sha256_file(path)
    if expected != actual:
        return f"its sha256 {actual[:12]}… does not match its manifest {side.name} ({(expected or 'no entry')[:12]}…)"
    return None


def write_folder_manifest(folder: Path) -> Path:
    """``<folder>/SHA256SUMS``: the sha256 of every file under ``folder`` (relative paths, sorted)."""
    folder = Path(folder)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != FOLDER_MANIFEST and not p.name.startswith(f".{FOLDER_MANIFEST}.tmp")]
    path = folder / FOLDER_MANIFEST
    _atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def folder_manifest_problem(folder: Path) -> Optional[str]:
    """None when every file ``SHA256SUMS`` lists is there with its sha256 (or there is no manifest); else a line naming
    the first file that is missing or differs."""
    manifest = Path(folder) / FOLDER_MANIFEST
    if not manifest.is_file():
        return None
    for name, expected in sorted(_read_manifest(manifest).items()):
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing: the model's manifest {manifest} lists it"
        if sha256_file(path) != expected:
            return f"{path} does not match its sha256 in {manifest}: the file changed or was damaged after the run saved it"
    return None
