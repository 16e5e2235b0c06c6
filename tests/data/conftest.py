"""Fixtures for the data pipeline tests: real image files written with PIL, a tiny offline processor."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from PIL import Image

RES = 32  # images in tests are small; datasets load them at 32 px
MAX_LEN = 16


def make_image(path: Path, seed: int = 0, size: Tuple[int, int] = (48, 40), fmt: str = "JPEG") -> Path:
    """A real image file of random colour blocks (deterministic per seed)."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    arr = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[: size[1], : size[0]]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


def make_truncated_jpeg(path: Path, seed: int = 0) -> Path:
    buf = io.BytesIO()
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def processor():
    from clipexp.models.clip import build_processor

    return build_processor(RES, MAX_LEN)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """A folder with good and bad image files (names say which)."""
    root = tmp_path / "imgs"
    make_image(root / "a.jpg", 1)
    make_image(root / "b.png", 2, fmt="PNG")
    make_image(root / "sub" / "c.jpg", 3, size=(64, 32))
    make_image(root / "d.jpg", 4)
    make_truncated_jpeg(root / "trunc.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    make_image(tmp_path / "outside.jpg", 5)
    return root


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_img():
    """``make_img(path, seed=0, size=(48, 40), fmt="JPEG")`` writes a real image file."""
    return make_image
