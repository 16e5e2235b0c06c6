"""Decode an image file into a uint8 tensor, and the cacheable "resize the shorter side" step.

The pipeline for every image is ``decode -> resize shorter side to R (uint8 [3, H, W]) -> transform``;
the first two steps are :func:`load_resized`, whose output is what :class:`~clipexp.data.ImageCache`
stores. Decoding is *complete* (every byte of the entropy-coded stream is read), so truncated and
corrupt files fail here with a short reason, never later with a bare PIL traceback.

JPEG and PNG go through ``torchvision.io.decode_image`` (libjpeg-turbo/libpng, ~1.5x faster than PIL here);
other formats, and anything torchvision refuses, go through PIL, which also turns a refusal into a
readable reason. EXIF orientation is applied. Every mode becomes 8-bit RGB by its real range
(:func:`pil_to_rgb`: 16-bit by its high byte, 32-bit integer and float by the smallest standard range holding
the values, alpha dropped, palettes, CMYK, bilevel); an animation gives its first frame. The header is read first: an image over
PIL's decompression-bomb limit is refused before either decoder allocates it. Note: if some other library sets
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` globally, PIL accepts truncated files; the
torchvision path does not depend on that switch.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from clipexp.errors import UserError

Tensor = torch.Tensor
log = logging.getLogger(__name__)

#: The interpolations a run can resize with (``model.image_interpolation``). ``bicubic`` (the default)
#: and ``bilinear`` are antialiased, as CLIP's own image processor; ``nearest`` keeps source pixels as
#: they are (``NEAREST_EXACT``: the source pixel under each output pixel's centre, as PIL's ``NEAREST``),
#: so fine high-frequency texture (a textile's salt-and-pepper defect) survives a downscale that an
#: antialiasing filter averages away.
INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST_EXACT,
}
#: The same names as PIL resampling codes (``CLIPImageProcessor.resample``): 0 NEAREST, 2 BILINEAR, 3 BICUBIC
PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
#: The default interpolation: bicubic + antialias, as CLIP's own image processor.
RESIZE_INTERPOLATION = "bicubic"


def check_interpolation(name: str) -> str:
    """``name`` if it is one of :data:`INTERPOLATIONS`, else a ValueError naming the choices."""
    if name not in INTERPOLATIONS:
        raise ValueError(f"image interpolation {name!r} is invalid: one of {', '.join(INTERPOLATIONS)}")
    return name


def interpolation_of_resample(resample) -> str:
    """The interpolation name of a PIL resampling code (a saved image processor's ``resample``); codes
    with no name here (LANCZOS, BOX, HAMMING) read as ``bicubic``, the closest antialiased filter."""
    code = int(getattr(resample, "value", resample))
    return next((name for name, c in PIL_RESAMPLE.items() if c == code), RESIZE_INTERPOLATION)


class ImageDecodeError(UserError, ValueError):
    """An image file cannot be used. ``reason`` completes "image 'x.jpg' ..." (e.g. "not found")."""

    def __init__(self, path: Union[str, Path], reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"image '{path}' {reason}")


def _sniff(head: bytes) -> str:
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return ""


def read_bytes(path: Union[str, Path]) -> bytearray:
    """Read a file into a (writable) bytearray, mapping OS errors to :class:`ImageDecodeError`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = bytearray(size)
            n = f.readinto(buf)
    except FileNotFoundError:
        raise ImageDecodeError(path, "not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(path, "cannot be read (permission denied)") from None
    except OSError as err:
        raise ImageDecodeError(path, f"cannot be read ({err.strerror or err})") from None
    if n != size:
        del buf[n:]
    if not buf:
        raise ImageDecodeError(path, "is empty (0 bytes)")
    return buf


def _too_large(pixels: int, path: Union[str, Path]) -> ImageDecodeError:
    from PIL import Image

    return ImageDecodeError(path, f"is too large to decode ({pixels:,} pixels, over PIL's decompression-bomb limit of "
                                  f"{Image.MAX_IMAGE_PIXELS:,}; set PIL.Image.MAX_IMAGE_PIXELS higher if you trust this file)")


def _open(data: bytearray, path: Union[str, Path], max_pixels: Optional[int] = None):
    """PIL's lazy open: the header only. An image over PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``), or over ``max_pixels`` (a served model's own limit), is refused
    here, before any decoder allocates it, whichever decoder (torchvision or PIL) would decode it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over the limit: refused below
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "is not an image file (cannot identify image format)") from None
    except Image.DecompressionBombError as err:  # over twice the limit: PIL refuses to open it
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_large(int(found.group(1)) if found else 0, path) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageDecodeError(path, f"is truncated or corrupt ({str(err) or type(err).__name__})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise _too_large(im.width * im.height, path)
    if max_pixels and im.width * im.height > max_pixels:
        raise ImageDecodeError(path, f"is {im.width}x{im.height} = {im.width * im.height:,} pixels, over this model's limit of "
                                     f"{max_pixels:,} pixels per image (CLIPEXP_MAX_IMAGE_PIXELS); send a smaller image")
    return im


#: modes whose alpha is dropped (the colour under it is kept, as for RGBA): converted through RGBA first
_ALPHA_MODES = ("RGBa", "PA")
#: the value ranges tried, smallest first, for modes whose files carry none (32-bit integer I, float F)
_RANGES = {"I": (255, 65535, 2**31 - 1), "F": (1.0, 255.0, 65535.0)}
_KIND = {"I": "32-bit integer", "F": "32-bit float"}
_RANGE_LOGGED: set = set()


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_of(mode: str, top: float, name: Union[str, Path]) -> float:
    """The range a mode-I or mode-F image is read by: the smallest standard one holding its largest value
    (F beyond 0-65535: its own largest value). Logged once per mode and process."""
    ranges = _RANGES[mode]
    hi = next((r for r in ranges if top <= r), ranges[-1] if mode == "I" else top)
    if mode not in _RANGE_LOGGED:
        _RANGE_LOGGED.add(mode)
        tried = ", ".join(f"0-{_fmt(r)}" for r in ranges[:-1]) + f" and 0-{_fmt(ranges[-1])}"
        tail = "" if mode == "I" else ", else by its own largest value"
        log.warning("image '%s' is %s (mode %s), whose files carry no value range: it is read as 0-%s (its largest value, %s, "
                    "fits it); every such image is read by the smallest of %s that holds its values%s (save 8- or 16-bit "
                    "data as 8- or 16-bit files to fix the range)", name, _KIND[mode], mode, _fmt(hi), _fmt(top), tried, tail)
    return hi


def _high_bits(values, mode: str, name: Union[str, Path]) -> Tensor:
    """A one-channel image of more than 8 bits (I;16*, I, F) -> uint8 ``[3, H, W]`` by its real range: 16-bit
    by its high byte (as torchvision's 16-bit PNG decoder and PIL's 16-bit RGB TIFFs), 32-bit modes by the range
    :func:`_range_of` picks. Values below 0 (and NaN) read as 0."""
    import numpy as np

    if mode.startswith("I;16"):
        return _gray3(torch.from_numpy((np.asarray(values).astype(np.uint16) >> 8).astype(np.uint8)))
    arr = np.asarray(values)
    if mode == "I":
        arr = np.clip(arr.astype(np.int64), 0, None)
        hi = _range_of("I", int(arr.max(initial=0)), name)
        shift = {255: 0, 65535: 8}.get(hi, 23)  # the high byte of 8, 16 or 31 bits
        return _gray3(torch.from_numpy((arr >> shift).clip(0, 255).astype(np.uint8)))
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(0, None)
    top = float(arr.max(initial=0.0))
    hi = _range_of("F", top, name) or 1.0
    scaled = np.floor(arr / 256.0) if hi == 65535.0 else np.rint(arr * (255.0 / hi))
    return _gray3(torch.from_numpy(scaled.clip(0, 255).astype(np.uint8)))


def _gray3(gray: Tensor) -> Tensor:
    return gray.unsqueeze(0).expand(3, -1, -1).contiguous()


def pil_to_rgb(im, name: Union[str, Path] = "<image>") -> Tensor:
    """A loaded PIL image of any mode -> uint8 RGB ``[3, H, W]`` by its real range: 16-bit (``I;16``, ``I;16B``)
    by its high byte, 32-bit integer (``I``) and float (``F``) images by the smallest standard range that holds
    their values (logged once), alpha dropped (``RGBA``, ``LA``, ``PA``, palettes with transparency: the colour
    under it), ``1`` as 0/255, ``CMYK``, ``P``, ``LAB``, ``YCbCr``, ``HSV`` by PIL's conversion."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bits(im, mode, name)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as err:
            raise ImageDecodeError(name, f"has image mode {mode}, which cannot be converted to RGB ({err}); save it as RGB") from None
    return TF.pil_to_tensor(im).contiguous()


def _decode_pil(im, path: Union[str, Path]) -> Tensor:
    """Decode an opened PIL image (the first frame of an animation) to uint8 RGB, upright (EXIF)."""
    from PIL import ImageOps

    try:
        im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageDecodeError(path, f"is truncated or corrupt ({str(err) or type(err).__name__})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block is not a broken image
        pass
    return pil_to_rgb(im, path)


def decode_image_file(path: Union[str, Path], max_pixels: Optional[int] = None) -> Tensor:
    """Fully decode an image file to a uint8 RGB tensor ``[3, H, W]``, upright (EXIF orientation applied);
    raise :class:`ImageDecodeError`."""
    return decode_image_bytes(read_bytes(path), path, max_pixels)


def decode_image_bytes(data: Union[bytes, bytearray], name: Union[str, Path] = "<bytes>", max_pixels: Optional[int] = None) -> Tensor:
    """:func:`decode_image_file` for an encoded image already in memory (``name`` words the errors;
    ``max_pixels``: refuse larger images from their header, before decoding)."""
    path = name
    if not data:
        raise ImageDecodeError(path, "is empty (0 bytes)")
    data = data if isinstance(data, bytearray) else bytearray(data)
    im = _open(data, path, max_pixels)
    if _sniff(bytes(data[:8])):
        from torchvision.io import ImageReadMode, decode_image

        try:
            img = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            img = None  # let PIL decide, and word the reason
        if img is not None:
            if img.dtype != torch.uint8:  # 16-bit PNG
                img = TF.to_dtype(img, torch.uint8, scale=True)
            return img
    return _decode_pil(im, path)


def resize_shorter(image: Tensor, resolution: int, interpolation: str = RESIZE_INTERPOLATION) -> Tensor:
    """Resize a ``[3, H, W]`` tensor (uint8, or float in [0, 1]) so its shorter side is ``resolution``
    (no-op when it is), with ``interpolation`` (one of :data:`INTERPOLATIONS`; bicubic and bilinear antialiased)."""
    h, w = image.shape[-2:]
    if min(h, w) == resolution:
        return image
    mode = INTERPOLATIONS[check_interpolation(interpolation)]
    out = TF.resize(image, [resolution], interpolation=mode, antialias=mode != InterpolationMode.NEAREST_EXACT)
    return out.clamp_(0.0, 1.0) if out.is_floating_point() else out  # bicubic overshoots; uint8 saturates already


def channels_last(image: Tensor) -> Tensor:
    """The same ``[3, H, W]`` image with channels-last memory (``[H, W, 3]`` contiguous underneath): what
    OpenCV reads without a copy (:mod:`clipexp.data.transforms`)."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def load_resized(path: Union[str, Path], resolution: int, interpolation: str = RESIZE_INTERPOLATION) -> Tensor:
    """Decode + resize shorter side: the cacheable step. uint8 ``[3, H, W]`` with ``min(H, W) == resolution``,
    channels-last memory (see :func:`channels_last`)."""
    return channels_last(resize_shorter(decode_image_file(path), resolution, interpolation))


def image_size(path: Union[str, Path]):
    """``(width, height)`` from the file header only (cheap), or ``None`` when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None
