"""The augmentation's maths on uint8 (or [0, 1] float) ``[H, W, 3]`` arrays, with OpenCV.

How, and why: the crop, resize, flips and rotation are one affine map, applied in a single bilinear
``cv2.warpAffine`` on the uint8 image (one resampling instead of two; corners a rotation uncovers show
the image around the crop where there is any, black only outside the image). Brightness, contrast and
saturation are linear in the pixel values, so the three are one 3x4 colour matrix, applied by
``cv2.transform`` with uint8 saturation (clamping once, at the end, where torchvision clamps after each
of the three, in a random order: the two agree except for pixels pushed past white or black midway).
(A uint8 image is warped as RGBA: OpenCV vectorises the 4-channel warp only.) One warp and one matrix cost a
tenth of the same policy in torchvision.transforms.v2 (``benchmarks/throughput.py``). A crop more than 4/3 larger than R
along a side (wide or tall images) is first shrunk with ``INTER_AREA``, the anti-aliased reduction.
With ``interpolation="nearest"`` (``model.image_interpolation``) the warp and that shrink are
``INTER_NEAREST`` instead: every output pixel is a source pixel, so fine texture is not averaged away.

:class:`~clipexp.data.ImageTransform` draws the :class:`AugmentParams` (torchvision's distributions,
:func:`random_crop`) and applies them with :func:`warp` and :func:`jitter`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator, Tuple

import numpy as np
import torch

Tensor = torch.Tensor

#: ITU-R 601 luma weights, as torchvision's ``rgb_to_grayscale`` (contrast and saturation use them)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_MIN_SCALE_WITHOUT_AREA = 0.75  # a crop shrunk by more than 4/3 along a side is reduced with INTER_AREA first


@functools.lru_cache(maxsize=None)
def _cv2():
    """OpenCV, single-threaded. Its thread pool is not fork-safe: a DataLoader worker forked after the
    pool ran deadlocks in its first warp (reproduced with opencv-python-headless 5.0). One image is a
    fraction of a millisecond anyway; the loader's workers are the parallelism."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation: the crop box in the (resized) source image, flips, angle, colour factors."""

    top: int
    left: int
    height: int
    width: int
    hflip: bool = False
    vflip: bool = False
    angle: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    @property
    def jitters(self) -> bool:
        return (self.brightness, self.contrast, self.saturation) != (1.0, 1.0, 1.0)


def center_crop_box(height: int, width: int, size: int) -> Tuple[int, int]:
    """``(top, left)`` of the centre ``size`` x ``size`` crop, rounded as torchvision's ``CenterCrop``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def color_matrix(brightness: float, contrast: float, saturation: float, mean_gray: float) -> np.ndarray:
    """The 3x4 matrix ``[M | o]`` with ``jitter(x) = M x + o`` for an RGB pixel ``x`` (pixel units).

    brightness ``x -> b x``; contrast ``x -> c x + (1 - c) mean(gray)``; saturation
    ``x -> s x + (1 - s) gray(x)``, gray = ``GRAY_WEIGHTS . x``. Without intermediate clamping the three
    commute (saturation keeps gray; brightness scales everything), so in any order::

        M = c b (s I + (1 - s) 1 w^T),   o = (1 - c) b mean_gray

    where ``mean_gray`` is the mean gray level of the image before jitter.
    """
    cb, s = contrast * brightness, saturation
    o = (1.0 - contrast) * brightness * mean_gray
    rows = [[cb * ((s if i == j else 0.0) + (1.0 - s) * GRAY_WEIGHTS[j]) for j in range(3)] + [o] for i in range(3)]
    return np.array(rows, dtype=np.float32)  # (built from floats: numpy's small-array calls cost 10x more here)


def _hwc(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` tensor -> ``[H, W, 3]`` array (a view when the memory is channels-last)."""
    hwc = image.permute(1, 2, 0)
    return (hwc if hwc.is_contiguous() else hwc.contiguous()).numpy()


def random_crop(height: int, width: int, scale_min: float, u: Iterator[float]) -> Tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: area in [scale_min, 1], log-uniform aspect in
    [3/4, 4/3], up to 10 tries, then the central crop of the clamped aspect. ``u``: uniform [0, 1) numbers."""
    area = height * width
    for _ in range(10):
        target = area * (scale_min + (1.0 - scale_min) * next(u))
        aspect = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * next(u))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(next(u) * (height - h + 1)), height - h)
            left = min(int(next(u) * (width - w + 1)), width - w)
            return top, left, h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * 4 / 3))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w



def warp(src: np.ndarray, p: AugmentParams, r: int, interpolation: str = "bicubic") -> np.ndarray:
    """Crop box -> ``r`` x ``r``, flips and rotation: one bilinear affine warp of an ``[H, W, C]`` array
    (a plain copy for an eval crop; ``INTER_AREA`` first for a large shrink). ``interpolation="nearest"``:
    nearest-neighbour warp and shrink; any other name (the resize's bicubic or bilinear): as described."""
    cv2 = _cv2()
    nearest = interpolation == "nearest"
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    sx, sy = r / p.width, r / p.height
    rotate_or_flip = p.angle != 0.0 or p.hflip or p.vflip
    if (sx, sy) == (1.0, 1.0) and not rotate_or_flip:  # a plain crop (eval): a copy of the box
        return np.ascontiguousarray(src[p.top : p.top + r, p.left : p.left + r])
    if min(sx, sy) < _MIN_SCALE_WITHOUT_AREA:  # shrink the box with anti-aliasing first, then warp r x r
        src = cv2.resize(src[p.top : p.top + p.height, p.left : p.left + p.width], (r, r),
                         interpolation=cv2.INTER_NEAREST_EXACT if nearest else cv2.INTER_AREA)
        if not rotate_or_flip:
            return src
        scale = np.eye(3)
    else:  # box -> r x r, pixel centres: x_out = sx (x - left + 1/2) - 1/2
        scale = np.array([[sx, 0.0, sx * (0.5 - p.left) - 0.5], [0.0, sy, sy * (0.5 - p.top) - 0.5], [0.0, 0.0, 1.0]])
    flip = np.diag([-1.0 if p.hflip else 1.0, -1.0 if p.vflip else 1.0, 1.0])
    flip[0, 2], flip[1, 2] = (r - 1.0 if p.hflip else 0.0), (r - 1.0 if p.vflip else 0.0)
    rot = np.vstack([cv2.getRotationMatrix2D(((r - 1) / 2.0, (r - 1) / 2.0), p.angle, 1.0), [0.0, 0.0, 1.0]])
    m = (rot @ flip @ scale)[:2]
    if src.dtype == np.uint8 and src.ndim == 3 and src.shape[2] == 3:
        # OpenCV's bilinear warp has a SIMD path for 4-channel uint8 and none for 3: padding to RGBA,
        # warping and dropping the pad is faster, with bit-identical RGB (each channel is interpolated on its own)
        out = cv2.warpAffine(cv2.cvtColor(src, cv2.COLOR_RGB2RGBA), m, (r, r), flags=flags,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
        return cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)
    return cv2.warpAffine(src, m, (r, r), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))

def jitter(img: np.ndarray, p: AugmentParams) -> np.ndarray:
    """Brightness, contrast and saturation of ``p`` as one colour matrix (uint8 saturating, float clipped to [0, 1])."""
    cv2 = _cv2()
    means = cv2.mean(img)[:3]
    mean_gray = sum(w * m for w, m in zip(GRAY_WEIGHTS, means))
    out = cv2.transform(img, color_matrix(p.brightness, p.contrast, p.saturation, mean_gray))
    if out.dtype != np.uint8:
        np.clip(out, 0.0, 1.0, out=out)
    return out
