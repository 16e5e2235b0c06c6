"""Writing files so that a reader never sees half of one, and telling later that a file is the one written.

* :func:`atomic_write`: every writer in clipexp (checkpoints, manifests, ``metrics.json``, the batch-size and
  image caches, images unpacked from a dataset, shards) writes a temp file beside the target and renames it
  into place; a failure (a full disk, a lost mount, a read-only folder) removes the temp file and leaves the
  previous file as it was.
* sha256 manifests: a file ``step_0000004.pt`` has ``step_0000004.pt.sha256`` beside it, a folder has
  ``SHA256SUMS`` listing every file in it; both in ``sha256sum`` format (``sha256sum -c`` checks them too).
  A file without a manifest (written by an older clipexp) is not checked.
* :func:`disk_full_error`: the ENOSPC / EDQUOT behind an error, however deep in its chain.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Union

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
CHECKSUM_SUFFIX = ".sha256"
FOLDER_MANIFEST = "SHA256SUMS"
TEMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """The temp file a write of ``path`` goes through: hidden, beside it, unique per process and thread."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}")


def atomic_write(path: Union[str, Path], write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temp file beside ``path``, which then replaces ``path`` in one rename.

    On any error the temp file is removed and the error propagates; ``path`` is untouched (the old file, or
    none). Creates the parent folder."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Union[str, Path], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: Union[str, Path], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def disk_full_error(err: Optional[BaseException]) -> Optional[OSError]:
    """The ``OSError`` of a full disk (ENOSPC / EDQUOT) in ``err`` or its causes, or None."""
    return _os_error(err, DISK_FULL)


def write_error(err: Optional[BaseException]) -> Optional[OSError]:
    """The ``OSError`` behind a failed write (any errno: a full disk, a quota, a read-only folder), or None."""
    return _os_error(err, None)


def _os_error(err: Optional[BaseException], errnos) -> Optional[OSError]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and (errnos is None or err.errno in errnos):
            return err
        err = err.__cause__ or err.__context__
    return None


def describe_os_error(err: OSError) -> str:
    """``No space left on device (ENOSPC)``: the reason and the errno's name."""
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    return f"{err.strerror or err}" + (f" ({name})" if name else "")


# ---------------------------------------------------------------------------------------- manifests
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    """``<file>.sha256``, the manifest of one file."""
    return Path(path).with_name(Path(path).name + CHECKSUM_SUFFIX)


def write_checksum(path: Path, digest: Optional[str] = None) -> Path:
    """Write ``<file>.sha256`` for ``path`` (``digest``: already computed, e.g. of the temp file renamed to ``path``)."""
    return write_text(checksum_path(path), f"{digest or sha256_file(path)}  {Path(path).name}\n")


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
             if p.is_file() and p.name != FOLDER_MANIFEST and TEMP_MARK not in p.name]
    return write_text(folder / FOLDER_MANIFEST, "\n".join(lines) + "\n")


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
