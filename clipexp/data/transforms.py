"""Image and text transforms: augmentation on uint8 images with OpenCV, a CLIP tokenizer.

Images always go ``decode -> resize shorter side to R (uint8, cacheable) -> transform``. The
transform receives the resized uint8 ``[3, H, W]`` tensor (or a PIL image / any-size tensor, which it
resizes first) and returns ``[3, R, R]``:

* eval (``augment=False``): the centre R x R crop;
* train (``augment=True``), the domain's augmentation policy (an ``AugmentationConfig``-like mapping),
  with the parameters torchvision's transforms would draw, from torch's RNG:

  - ``crop_scale_min < 1``: random resized crop (area in ``[crop_scale_min, 1]``, aspect 3/4..4/3;
    ``1``: centre crop);
  - ``hflip`` / ``vflip``: random flips (p=0.5 each);
  - ``rotation_degrees``: a rotation by an angle in ``[-d, d]`` (counter-clockwise) about the centre;
  - ``color_jitter``: brightness, contrast and saturation factors in ``[1-s, 1+s]``.

How (one affine warp and one colour matrix per image, with OpenCV), and why: :mod:`clipexp.data.augment`.

Output: ``output="float"`` (default) returns float32, scaled to [0, 1] and normalised with the
processor's ``image_mean``/``image_std`` (OpenAI CLIP's when none is given). ``output="uint8"``
returns the uint8 image as is (channels-last memory) and leaves normalisation to the batch:
:class:`PixelNormalizer` (``transform.normalizer``) turns a uint8 batch into the same floats, on
whichever device the batch is on. The trainer uses this: a quarter of the bytes through the loader
and to the GPU, and one vectorised conversion per batch instead of one per image.

Random draws come from the ``generator`` passed to the call (torch's global RNG without one);
:class:`~clipexp.data.CLIPDataset` passes one seeded per item with (seed, epoch, index), so results are
reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torchvision.transforms import v2

from clipexp.data.augment import AugmentParams, _hwc, center_crop_box, jitter, random_crop, warp
from clipexp.data.images import RESIZE_INTERPOLATION, check_interpolation, resize_shorter
from clipexp.data.normalize import PixelNormalizer
from clipexp.data.text import DEFAULT_TEMPLATES
from clipexp.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["DEFAULT_POLICY", "OUTPUTS", "ImageTransform", "MultiResolutionImageTransform", "domain_defaults", "processor_mean_std",
           "to_uint8_tensor"]

Tensor = torch.Tensor

DEFAULT_POLICY: Dict[str, Any] = dict(crop_scale_min=0.9, hflip=False, vflip=False, rotation_degrees=0.0, color_jitter=0.0)
OUTPUTS = ("float", "uint8")
_DRAWS = 4 * 10 + 6  # uniform numbers one draw may use: 10 crop tries x 4, 2 flips, angle, 3 colour factors


def _as_dict(obj: Any) -> Dict[str, Any]:
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Mapping):  # a dict, or an OmegaConf DictConfig (a MutableMapping whose values resolve on access)
        return dict(obj.items())
    return dict(vars(obj))


@functools.lru_cache(maxsize=None)
def _domain_yaml(name: str) -> Dict[str, Any]:
    import yaml

    from clipexp.paths import CONF_DIR

    try:
        return yaml.safe_load((CONF_DIR / "domain" / f"{name}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def domain_defaults(domain: Optional[str]) -> Dict[str, Any]:
    """A domain's ``prompt_templates`` and ``augmentation`` read from ``conf/domain/<name>.yaml``
    (used only when a caller passes a flat config instead of the policy/templates themselves)."""
    data = _domain_yaml(domain) if domain else {}
    return {
        "prompt_templates": list(data.get("prompt_templates") or DEFAULT_TEMPLATES),
        "augmentation": {**DEFAULT_POLICY, **(data.get("augmentation") or {})},
    }


def processor_mean_std(processor: Any) -> Tuple[Optional[Sequence[float]], Optional[Sequence[float]]]:
    ip = getattr(processor, "image_processor", None)
    return getattr(ip, "image_mean", None), getattr(ip, "image_std", None)


def to_uint8_tensor(image: Any) -> Tensor:
    """PIL image or tensor -> tensor ``[3, H, W]`` (uint8 stays uint8; grayscale is repeated)."""
    if isinstance(image, torch.Tensor):
        t = image
    else:
        from PIL import Image

        if isinstance(image, Image.Image):
            from clipexp.data.images import pil_to_rgb

            t = pil_to_rgb(image)
        else:
            raise TypeError(f"expected a PIL image or a [3, H, W] tensor, got {type(image).__name__}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t


class ImageTransform:
    """Resized image -> ``[3, R, R]`` (see module doc): float32 normalised, or uint8 with ``output="uint8"``.

    ``ImageTransform(config, augment=True)`` takes ``config.image_resolution`` and the policy of
    ``config.domain``; keywords override: ``resolution``, ``mean``/``std`` (or ``processor``, whose
    image processor gives them), ``policy`` (an ``AugmentationConfig`` or mapping), ``output``,
    ``interpolation`` (``config.image_interpolation``, else bicubic: see :data:`~clipexp.data.images.INTERPOLATIONS`),
    used by the resize and the augmentation's warp.
    ``sample(height, width)`` draws an :class:`AugmentParams`; ``apply(image, params)`` applies one.
    """

    def __init__(
        self,
        config: Any = None,
        augment: bool = False,
        *,
        resolution: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        policy: Any = None,
        processor: Any = None,
        output: str = "float",
        interpolation: Optional[str] = None,
    ):
        self.resolution = int(resolution or getattr(config, "image_resolution", None) or 224)
        self.interpolation = check_interpolation(
            interpolation or getattr(config, "image_interpolation", None) or RESIZE_INTERPOLATION)
        if processor is not None and (mean is None or std is None):
            pm, ps = processor_mean_std(processor)
            mean, std = mean or pm, std or ps
        self.mean = tuple(float(m) for m in (mean or OPENAI_CLIP_MEAN))
        self.std = tuple(float(s) for s in (std or OPENAI_CLIP_STD))
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is invalid: one of {', '.join(OUTPUTS)}")
        self.output = output
        self.normalizer = PixelNormalizer(self.mean, self.std)
        self.augment = bool(augment)
        if policy is None:
            policy = domain_defaults(getattr(config, "domain", None))["augmentation"] if config is not None else DEFAULT_POLICY
        self.policy = {**DEFAULT_POLICY, **_as_dict(policy)}
        p = self.policy
        ops = []
        if self.augment:
            ops += ["random_resized_crop"] if float(p["crop_scale_min"]) < 1.0 else []
            ops += [name for name, on in (("hflip", p["hflip"]), ("vflip", p["vflip"]),
                                          ("rotation", float(p["rotation_degrees"]) > 0),
                                          ("color_jitter", float(p["color_jitter"]) > 0)) if on]
        self.ops: Tuple[str, ...] = tuple(ops)  # the random operations, in the order they are drawn
        self.is_random = bool(ops)

    # ------------------------------------------------------------------------------------- parameters
    def sample(self, height: int, width: int, generator: Optional[torch.Generator] = None) -> AugmentParams:
        """Draw the parameters for a ``height`` x ``width`` source from ``generator`` (default: torch's
        global RNG); eval: the centre crop.

        One ``torch.rand`` call gives every uniform number the draw may need (torch calls cost more
        than the arithmetic here); the distributions are torchvision's.
        """
        r, p = self.resolution, self.policy
        if not self.ops:
            (top, left) = center_crop_box(height, width, r)
            return AugmentParams(top, left, r, r)
        u = iter(torch.rand(_DRAWS, dtype=torch.float64, generator=generator).tolist())
        if "random_resized_crop" in self.ops:
            top, left, h, w = random_crop(height, width, float(p["crop_scale_min"]), u)
        else:
            (top, left), h, w = center_crop_box(height, width, r), r, r
        hflip = "hflip" in self.ops and next(u) < 0.5
        vflip = "vflip" in self.ops and next(u) < 0.5
        d = float(p["rotation_degrees"])
        angle = (2.0 * next(u) - 1.0) * d if "rotation" in self.ops else 0.0
        factors = (1.0, 1.0, 1.0)
        if "color_jitter" in self.ops:
            s = float(p["color_jitter"])
            low, high = max(0.0, 1.0 - s), 1.0 + s
            factors = tuple(low + (high - low) * next(u) for _ in range(3))
        return AugmentParams(top, left, h, w, hflip, vflip, angle, *factors)

    # -------------------------------------------------------------------------------------- applying
    def apply(self, image: Tensor, params: AugmentParams) -> Tensor:
        """Apply ``params`` to a resized ``[3, H, W]`` image (uint8, or float in [0, 1]); same dtype, ``[3, R, R]``."""
        r = self.resolution
        src = _hwc(image)
        out = warp(src, params, r, self.interpolation)
        if params.jitters:
            out = jitter(out, params)
        return torch.from_numpy(out).permute(2, 0, 1)

    def __call__(self, image: Any, generator: Optional[torch.Generator] = None) -> Tensor:
        """Transform one image; random draws come from ``generator`` (default: torch's global RNG)."""
        t = to_uint8_tensor(image)
        if t.dtype not in (torch.uint8, torch.float32):
            t = t.float()
        if min(t.shape[-2:]) != self.resolution:
            t = resize_shorter(t, self.resolution, self.interpolation)
        out = self.apply(t, self.sample(*t.shape[-2:], generator=generator))
        if self.output == "uint8":
            return out if out.dtype == torch.uint8 else out.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        if out.dtype == torch.uint8:
            return self.normalizer(out)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((out - mean) / std).contiguous()

    def __repr__(self) -> str:
        return (f"ImageTransform(resolution={self.resolution}, augment={self.augment}, policy={self.policy}, "
                f"output={self.output!r}, interpolation={self.interpolation!r})")


class MultiResolutionImageTransform:
    """One :class:`ImageTransform` per resolution; ``transform(image, resolution=288)``.

    The default resolution is ``config.image_resolution`` when it is in ``resolutions``, else the first.
    A resolution not in the list is built on first use. Give datasets the largest resolution as
    their (cached) ``resolution`` so smaller outputs are downscaled, never upscaled.
    """

    def __init__(self, config: Any = None, resolutions: Sequence[int] = (224, 288, 384), augment: bool = True, **kwargs: Any):
        if not resolutions:
            raise ValueError("resolutions must list at least one resolution")
        self.config, self.augment, self.kwargs = config, augment, kwargs
        self.resolutions = [int(r) for r in resolutions]
        self.transforms = {r: ImageTransform(config, augment, resolution=r, **kwargs) for r in self.resolutions}
        res = getattr(config, "image_resolution", None)
        self.default_resolution = res if res in self.transforms else self.resolutions[0]
        self.resolution = max(self.resolutions)
        self.is_random = any(t.is_random for t in self.transforms.values())

    def __call__(self, image: Any, resolution: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        r = int(resolution or self.default_resolution)
        if r not in self.transforms:
            self.transforms[r] = ImageTransform(self.config, self.augment, resolution=r, **self.kwargs)
        return self.transforms[r](image, generator=generator)
