"""Shared by the shard tests (tests/data/test_webdataset.py, tests/test_shards_train.py): a CSV of 80
generated images (labels a/b; captions repeating every 20 pairs) that to_shards turns into shards."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

N = 80


def write_image(path: Path, seed: int, size=(48, 40)) -> Path:
    """A real JPEG of random colour blocks (deterministic per seed)."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    arr = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[: size[1], : size[0]]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "JPEG", quality=92)
    return path


def write_csv(root: Path, n: int = N) -> Path:
    rows = []
    for i in range(n):
        write_image(root / "img" / f"{i:03d}.jpg", seed=i)
        rows.append({"image_path": f"img/{i:03d}.jpg", "caption": f"pattern number {i % 20}", "label": "ab"[i % 2]})
    path = root / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["image_path", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    return path
