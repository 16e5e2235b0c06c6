"""Does a resize keep the textile local defect visible? A hand-made detector's AUROC per interpolation.

    python benchmarks/speckle_probe.py                 # 150 local-defect + 150 nominal images, 160 px
    python benchmarks/speckle_probe.py --n 500 --resolution 128

The local defect of the offline textile set is a ~10 px salt-and-pepper speckle in a 250 px image. The
probe scores each image by the largest local high-frequency energy in it: the absolute Laplacian of the
grey image, averaged over 5 x 5 boxes, its maximum over the image divided by its median (the fabric's own
texture level). A score that separates local-defect images from nominal ones (AUROC near 1) means the
speckle is still in the pixels a model sees; near 0.5 means the resize erased it. It prints one row per
resize: native (no resize), bicubic (antialiased, clipexp's default and CLIP's processor), bilinear
(antialiased), OpenCV ``INTER_AREA``, nearest (``model.image_interpolation=nearest``), and nearest followed
by a 10 degree rotation, nearest-neighbour (the augmentation's warp with nearest) or bilinear (the warp
of the other interpolations).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def score(gray: np.ndarray) -> float:
    import cv2

    lap = np.abs(cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F, ksize=1))
    energy = cv2.blur(lap, (5, 5))[2:-2, 2:-2]
    return float(energy.max() / max(float(np.median(energy)), 1e-6))


def auroc(positive, negative) -> float:
    """P(score of a positive > score of a negative), ties counting half (the Mann-Whitney statistic)."""
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def main(argv=None) -> None:
    import cv2

    from clipexp.data.images import decode_image_file, resize_shorter
    from clipexp.data.textile import textile_root

    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--n", type=int, default=150, help="images per class (local defect, nominal)")
    a.add_argument("--resolution", type=int, default=160)
    args = a.parse_args(argv)
    root = textile_root()
    files = {c: sorted(root.rglob(f"{c}/*"))[: args.n] for c in ("local", "nominal")}
    r = args.resolution

    def rotated(img: np.ndarray, flags: int) -> np.ndarray:
        m = cv2.getRotationMatrix2D(((r - 1) / 2, (r - 1) / 2), 10.0, 1.0)
        return cv2.warpAffine(img, m, (r, r), flags=flags, borderMode=cv2.BORDER_REFLECT)

    def resized(t: torch.Tensor, interpolation: str) -> np.ndarray:  # clipexp's resize of a grey [H, W] image
        return resize_shorter(t[None], r, interpolation)[0].numpy()

    resizes = {
        "native (no resize)": lambda t: t.numpy(),
        "bicubic (antialiased)": lambda t: resized(t, "bicubic"),
        "bilinear (antialiased)": lambda t: resized(t, "bilinear"),
        "INTER_AREA": lambda t: cv2.resize(t.numpy(), (r, r), interpolation=cv2.INTER_AREA),
        "nearest": lambda t: resized(t, "nearest"),
        "nearest + 10 deg nearest rotation": lambda t: rotated(resized(t, "nearest"), cv2.INTER_NEAREST),
        "nearest + 10 deg bilinear rotation": lambda t: rotated(resized(t, "nearest"), cv2.INTER_LINEAR),
    }
    grays = {c: [decode_image_file(f).float().mean(0).round().to(torch.uint8) for f in fs] for c, fs in files.items()}
    print(f"{len(files['local'])} local-defect vs {len(files['nominal'])} nominal images, {r} px")
    print(f"{'resize':<38}{'AUROC':>7}")
    for name, fn in resizes.items():
        s = {c: [score(fn(g)) for g in gs] for c, gs in grays.items()}
        print(f"{name:<38}{auroc(s['local'], s['nominal']):>7.3f}")


if __name__ == "__main__":
    main()
