"""Decoded-image cache: epochs after the first skip JPEG decoding and the resize.

What is cached is the output of :func:`~clipexp.data.images.load_resized`: the image decoded and
resized so its shorter side is the target resolution, as a uint8 ``[3, H, W]`` tensor with
channels-last memory (what the OpenCV augmentation reads without a copy). Random
augmentation happens *after* the cache, so cached and uncached loading give identical tensors.

Every entry is keyed by the file's absolute path, size and modification time (``st_mtime_ns``):
a file changed on disk is decoded again on its next read.

Modes
-----
``memory``  a dict in this process. Fill it before DataLoader workers start (``build_datasets`` does,
            during validation) so forked workers share it copy-on-write; under the ``spawn`` start
            method it is packed into one shared-memory buffer when the dataset is sent to workers.
            ``memory_mb`` caps it: beyond the cap images are simply decoded each time.
``disk``    one file per image (``<sha1>.u8``: a 16-byte header + raw ``H x W x 3`` pixels) in ``cache_dir``
            (default ``$CLIPEXP_CACHE_DIR`` or ``./.clipexp_cache``), ``images/r<resolution>/``
            below it (``r<resolution>-<interpolation>/`` for an interpolation other than bicubic). Written
            atomically, so several workers may fill it at once; it survives runs.
            Stale entries of changed files are never read again (delete the folder to reclaim space).
``none``    decode every time.
``auto``    ``memory`` when the estimated size (images x 3 x R x R x mean aspect, the aspect
            measured from up to 64 file headers) fits ``memory_mb``, else ``none``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from clipexp.files import atomic_write
from clipexp.data.images import RESIZE_INTERPOLATION, check_interpolation, image_size, load_resized

log = logging.getLogger(__name__)

Tensor = torch.Tensor
MODES = ("memory", "disk", "none", "auto")
_MAGIC = b"CXC2"  # CXC1 files (channels-first pixels) read as misses and are rewritten
_HEADER = struct.Struct("<4sIII")  # magic, channels, height, width


def default_cache_dir() -> Path:
    """``$CLIPEXP_CACHE_DIR`` or ``./.clipexp_cache``."""
    return Path(os.environ.get("CLIPEXP_CACHE_DIR") or Path.cwd() / ".clipexp_cache")


def _stat_key(path: Union[str, Path]) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def estimate_bytes(paths: Sequence[Union[str, Path]], resolution: int, sample: int = 64) -> int:
    """Estimated bytes of ``len(paths)`` resized uint8 images (aspect from up to ``sample`` headers)."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    if not unique:
        return 0
    step = max(1, len(unique) // sample)
    per = []
    for p in unique[::step][:sample]:
        size = image_size(p)
        if size and min(size) > 0:
            per.append(3 * resolution * round(resolution * max(size) / min(size)))
    mean = sum(per) / len(per) if per else 3 * resolution * resolution
    return int(mean * len(unique))


class ImageCache:
    """Cache of resized uint8 images (see module doc). ``get(path)`` is the only call datasets make."""

    def __init__(
        self,
        mode: str = "memory",
        resolution: int = 224,
        cache_dir: Optional[Union[str, Path]] = None,
        memory_mb: Optional[float] = None,
        *,
        interpolation: str = RESIZE_INTERPOLATION,
    ):
        if mode not in MODES:
            raise ValueError(f"cache mode {mode!r} is invalid: one of {', '.join(MODES)}")
        self.mode = mode  # "auto" until prepare(paths) picks memory or none; behaves as capped memory meanwhile
        self.resolution = int(resolution)
        self.interpolation = check_interpolation(interpolation)  # the resize's (load_resized)
        if mode == "auto" and memory_mb is None:
            memory_mb = 2048
        self.memory_mb = memory_mb
        self.memory_limit = None if memory_mb is None else int(memory_mb * 2**20)
        self.dir: Optional[Path] = None
        if mode == "disk":
            sub = f"r{self.resolution}" + ("" if self.interpolation == RESIZE_INTERPOLATION else f"-{self.interpolation}")
            self.dir = Path(cache_dir or default_cache_dir()) / "images" / sub
            self.dir.mkdir(parents=True, exist_ok=True)
        self._mem: Dict[str, Tuple[int, int, Tensor]] = {}
        self._bytes = 0
        self._full_warned = False
        self._lock = threading.Lock()
        self._packed = None
        self.hits = 0
        self.misses = 0

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def auto(
        cls,
        mode: str,
        paths: Sequence[Union[str, Path]],
        resolution: int,
        memory_mb: float = 2048,
        cache_dir: Optional[Union[str, Path]] = None,
        interpolation: str = RESIZE_INTERPOLATION,
    ) -> "ImageCache":
        """Build a cache and resolve ``auto`` for these paths (see :meth:`prepare`)."""
        return cls(mode, resolution, cache_dir, memory_mb if mode in ("memory", "auto") else None,
                   interpolation=interpolation).prepare(paths)

    def prepare(self, paths: Sequence[Union[str, Path]]) -> "ImageCache":
        """Resolve ``auto``: memory when the estimate for ``paths`` fits ``memory_mb``, else none."""
        if self.mode == "auto":
            need = estimate_bytes(paths, self.resolution)
            self.mode = "memory" if need <= self.memory_limit else "none"
            log.info("image cache: auto -> %s (estimated %.0f MB for %d images at %dpx, limit %s MB)",
                     self.mode, need / 2**20, len(set(map(str, paths))), self.resolution, self.memory_mb)
            if self.mode == "none":
                self.clear()
        return self

    # ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._mem)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _disk_file(self, path: str, size: int, mtime: int) -> Path:
        digest = hashlib.sha1(f"{path}|{size}|{mtime}|{self.resolution}".encode()).hexdigest()
        return self.dir / digest[:2] / f"{digest}.u8"  # type: ignore[operator]

    def get(self, path: Union[str, Path]) -> Tensor:
        """The resized uint8 image of ``path`` (decoded on a miss; raises ImageDecodeError)."""
        if self.mode == "none":
            return load_resized(path, self.resolution, self.interpolation)
        key = os.path.abspath(path)
        try:
            size, mtime = _stat_key(key)
        except OSError:
            return load_resized(path, self.resolution, self.interpolation)  # raises the proper "not found" reason
        if self.mode in ("memory", "auto"):
            hit = self._mem.get(key)
            if hit is not None and hit[0] == size and hit[1] == mtime:
                self.hits += 1
                return hit[2]
            img = load_resized(path, self.resolution, self.interpolation)
            self.misses += 1
            self._store(key, size, mtime, img, replaced=hit)
            return img
        f = self._disk_file(key, size, mtime)
        img = self._read(f)
        if img is not None:
            self.hits += 1
            return img
        img = load_resized(path, self.resolution, self.interpolation)
        self.misses += 1
        self._write(f, img)
        return img

    def _store(self, key: str, size: int, mtime: int, img: Tensor, replaced=None) -> None:
        n = img.numel()
        with self._lock:
            if replaced is not None:
                self._bytes -= replaced[2].numel()
            elif self.memory_limit is not None and self._bytes + n > self.memory_limit:
                if not self._full_warned:
                    log.warning("image cache full (%d MB): further images are decoded each time",
                                self.memory_limit // 2**20)
                    self._full_warned = True
                return
            self._mem[key] = (size, mtime, img)
            self._bytes += n
            self._packed = None

    @staticmethod
    def _read(f: Path) -> Optional[Tensor]:
        try:
            with open(f, "rb") as fh:
                head = fh.read(_HEADER.size)
                if len(head) != _HEADER.size:
                    return None
                magic, c, h, w = _HEADER.unpack(head)
                if magic != _MAGIC:
                    return None
                buf = bytearray(c * h * w)
                if fh.readinto(buf) != len(buf):
                    return None
        except OSError:
            return None
        return torch.frombuffer(buf, dtype=torch.uint8).view(h, w, c).permute(2, 0, 1)

    def _write(self, f: Path, img: Tensor) -> None:
        c, h, w = img.shape

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                fh.write(_HEADER.pack(_MAGIC, c, h, w))
                fh.write(img.permute(1, 2, 0).contiguous().numpy().tobytes())

        try:
            atomic_write(f, write)
            self._bytes += img.numel()
        except OSError as err:  # a full or read-only disk must not stop training
            log.warning("cannot write image cache file %s (%s)", f, err)

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0
            self._packed = None

    def __repr__(self) -> str:
        where = f", dir={self.dir}" if self.dir else ""
        return (f"ImageCache(mode={self.mode!r}, resolution={self.resolution}, interpolation={self.interpolation!r}, "
                f"entries={len(self)}{where})")

    # --- pickling (spawn-started DataLoader workers): one shared buffer instead of 1 tensor/image ---
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        if self._mem:
            if self._packed is None:
                keys = list(self._mem)
                flat = torch.cat([self._mem[k][2].permute(1, 2, 0).reshape(-1) for k in keys])  # HWC: no copy
                index, off = {}, 0
                for k in keys:
                    size, mtime, t = self._mem[k]
                    index[k] = (size, mtime, off, tuple(t.shape))
                    off += t.numel()
                self._packed = (flat, index)
            state["_mem"] = {}
            state["_packed"] = self._packed
        return state

    def __setstate__(self, state):
        packed = state.get("_packed")
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if packed is not None:
            flat, index = packed
            for k, (size, mtime, off, shape) in index.items():
                n = shape[0] * shape[1] * shape[2]
                c, h, w = shape
                self._mem[k] = (size, mtime, flat[off : off + n].view(h, w, c).permute(2, 0, 1))
