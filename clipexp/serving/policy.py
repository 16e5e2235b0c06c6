"""What a served model accepts: image bytes, never a path on the server, within per-request limits.

The batch tools (:mod:`clipexp.serving.predict`) read image files; a served model (the pyfunc model of
:mod:`clipexp.serving.pyfunc`, behind ``mlflow models serve``) takes each image as its bytes, base64-encoded
in the ``image`` column (a ``data:image/...;base64,`` prefix and line breaks are allowed; in process raw
``bytes`` too). A string that is not valid base64 is that row's error, worded as such, and nothing on the
server's disk is opened, stat'ed or checked for it: a caller learns nothing of the server's files.

Reading files on the server is off unless the operator named a folder at logging time
(``tracking.serve_file_root``, saved as the spec's ``serve_file_root``). Then a string that is not base64
(an image file name has a dot, which base64 never has) is a path relative to that folder: an absolute
path, a ``..`` component or a symbolic link is refused before anything outside the folder is touched.

Limits (:class:`ServeLimits`, read from the environment when the model loads, as ``CLIPEXP_BATCH_SIZE``):

* ``CLIPEXP_MAX_ROWS`` (default 256): rows per request; more is refused as a whole (HTTP 400).
* ``CLIPEXP_MAX_REQUEST_BYTES`` (default 64 MiB): the request's image and text cells together; refused as a whole.
* ``CLIPEXP_MAX_IMAGE_BYTES`` (default 16 MiB): one image's encoded bytes; that row's error (checked from the
  base64 length, before decoding it).
* ``CLIPEXP_MAX_IMAGE_PIXELS`` (default 40,000,000): one image's width x height, from its header before it is
  decoded; that row's error (PIL's decompression-bomb limit stays the hard cap).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional, Tuple

from clipexp.data.images import ImageDecodeError
from clipexp.serving.inference import InferenceError

ENV = {"max_rows": "CLIPEXP_MAX_ROWS", "max_request_bytes": "CLIPEXP_MAX_REQUEST_BYTES",
       "max_image_bytes": "CLIPEXP_MAX_IMAGE_BYTES", "max_image_pixels": "CLIPEXP_MAX_IMAGE_PIXELS"}
NO_PATHS = ("is not base64-encoded image data: a served model takes each image's bytes, base64-encoded, never a file path "
            "(it reads no file on the server unless its operator logged it with tracking.serve_file_root)")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold (see the module's docstring for each limit's error)."""

    max_rows: int = 256
    max_request_bytes: int = 64 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "ServeLimits":
        """The defaults, each replaced by its ``CLIPEXP_MAX_...`` variable when set (a whole number > 0)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV[f.name], "").strip().replace("_", "")
            if not raw:
                continue
            if not raw.isdigit() or int(raw) < 1:
                raise InferenceError(f"{ENV[f.name]}={environ[ENV[f.name]]!r} is not a whole number > 0: set it to the "
                                     f"{f.name.replace('_', ' ')} a request may have, or unset it (default {f.default:,})")
            values[f.name] = int(raw)
        return cls(**values)


class ServedSources:
    """The image reader of a served model (``CLIPInference(read_source=...)``) and its request checks."""

    def __init__(self, limits: ServeLimits, file_root: Optional[str] = None):
        self.limits = limits
        self.file_root = os.path.realpath(file_root) if file_root else None

    # ----------------------------------------------------------------------------------- request
    def check_request(self, frame: Any) -> None:
        """Rows and total size of a request DataFrame; raises :class:`InferenceError` (one line, HTTP 400)."""
        lim = self.limits
        if len(frame) > lim.max_rows:
            raise InferenceError(f"the request has {len(frame):,} rows, over this model's limit of {lim.max_rows:,} rows per "
                                 f"request (CLIPEXP_MAX_ROWS): send them in several requests")
        total = sum(len(v) for column in ("image", "text") if column in frame.columns for v in frame[column].tolist()
                    if isinstance(v, (str, bytes, bytearray, memoryview)))
        if total > lim.max_request_bytes:
            raise InferenceError(f"the request holds {total:,} bytes of images and texts, over this model's limit of "
                                 f"{lim.max_request_bytes:,} bytes per request (CLIPEXP_MAX_REQUEST_BYTES): send fewer or "
                                 f"smaller images per request")

    # ------------------------------------------------------------------------------------- image
    def __call__(self, source: Any) -> Tuple[Any, str]:
        """One ``image`` cell -> ``(bytes or a Path under the file root, name for errors)``; raises ImageDecodeError."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            name = f"<{len(source)} bytes>"
            self._check_size(len(source), name)
            return bytes(source), name
        if not isinstance(source, str) or not source.strip():
            raise ImageDecodeError("<empty>", "is missing: send the image's bytes, base64-encoded")
        text = source.strip()
        if text.startswith("data:") and ";base64," in text[:100]:
            text = text.split(",", 1)[1]
        text = "".join(text.split())  # MIME base64 breaks lines
        name = f"<base64 image, {len(text)} chars>"
        self._check_size(len(text) * 3 // 4, name)  # before decoding it
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            if self.file_root is None:
                raise ImageDecodeError(_shown(source.strip()), NO_PATHS) from None
            return self._under_root(source.strip())
        if not data:
            raise ImageDecodeError(name, "is empty (0 bytes)")
        return data, name

    def _check_size(self, n: int, name: str) -> None:
        if n > self.limits.max_image_bytes:
            raise ImageDecodeError(name, f"is {n:,} bytes, over this model's limit of {self.limits.max_image_bytes:,} bytes per "
                                         f"image (CLIPEXP_MAX_IMAGE_BYTES); send a smaller image")

    def _under_root(self, text: str) -> Tuple[Path, str]:
        """A path relative to the file root, refused before any file is touched when it could leave the root."""
        root = self.file_root
        shown = _shown(text)
        if "\x00" in text or text.startswith("~") or PurePosixPath(text).is_absolute():
            raise ImageDecodeError(shown, "is an absolute path: a served model reads files only under its serve_file_root, "
                                          "named relative to it (or send the image's bytes, base64-encoded)")
        if ".." in PurePosixPath(text).parts:
            raise ImageDecodeError(shown, "leaves the model's serve_file_root ('..'): name a file under it, relative to it")
        full, st = root, None
        for part in PurePosixPath(text).parts:  # one component at a time, never following a link: nothing outside is touched
            full = os.path.join(full, part)
            try:
                st = os.lstat(full)
            except OSError:
                raise ImageDecodeError(shown, "not found under the model's serve_file_root") from None
            if stat.S_ISLNK(st.st_mode):
                raise ImageDecodeError(shown, "goes through a symbolic link, which a served model does not follow: name a file "
                                              "under its serve_file_root itself")
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(shown, "is not a file under the model's serve_file_root")
        size = st.st_size
        self._check_size(size, shown)
        return Path(full), shown


def _shown(text: str) -> str:
    """A caller's string as an error names it: printable, at most 200 characters."""
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:197] + "..."
