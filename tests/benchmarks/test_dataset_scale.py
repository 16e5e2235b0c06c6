"""benchmarks/dataset_scale.py's data: distinct variants of the textile images (checked against the crop, flip
and rotation made by hand), distinct captions, the first-N sets, and the run configs it composes."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dataset_scale  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_variants_of_a_source_are_distinct_inside_the_image_and_repeatable():
    params = dataset_scale.distinct_params(7, 50)  # 100,000 images = 50 variants of each source
    assert len({tuple(sorted(p.items())) for p in params}) == 50
    assert params == dataset_scale.distinct_params(7, 50)
    assert all(160 <= p["side"] <= 250 and p["x"] + p["side"] <= 250 and p["y"] + p["side"] <= 250 for p in params)
    assert params != dataset_scale.distinct_params(8, 50)


def test_a_variant_is_the_crop_flip_and_rotation_of_its_source(tmp_path):
    import cv2

    from bench_data import textile_rows

    src = textile_rows()[0][0]
    p = {"side": 170, "x": 40, "y": 20, "flip": 1, "rot": 1, "quality": 95}
    dataset_scale.make_variant(src, tmp_path / "v.jpg", p)
    got = cv2.imread(str(tmp_path / "v.jpg")).astype(np.float32)
    want = np.rot90(cv2.imread(src)[20:190, 40:210][:, ::-1], 1).astype(np.float32)
    assert got.shape == want.shape == (170, 170, 3)
    assert np.abs(got - want).mean() < 3.0  # JPEG at quality 95 (the same pixels, re-encoded)
    wrong = np.rot90(cv2.imread(src)[20:190, 40:210], 1).astype(np.float32)  # without the flip: another image
    assert np.abs(got - wrong).mean() > 10 * np.abs(got - want).mean()


def test_generated_sets_are_distinct_files_with_distinct_captions_and_load_as_csv(tmp_path):
    from clipexp.data.formats import read_csv

    info = dataset_scale.generate(tmp_path, 6, jobs=1)
    assert info["generated"] == 6 and info["bytes"] > 0
    with (tmp_path / "pairs.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    files = [(tmp_path / r["image_path"]).read_bytes() for r in rows]
    assert len(set(files)) == 6 and len({r["caption"] for r in rows}) == 6
    assert rows[3]["caption"].startswith("#000003 a close-up photo")  # the textile set lists nominal first
    first4 = dataset_scale.pairs_csv(tmp_path, 4)
    pairs, problems = read_csv(first4)  # as the csv runs read it: every image decoded
    assert [p.captions[0] for p in pairs] == [r["caption"] for r in rows[:4]] and not problems
    assert dataset_scale.generate(tmp_path, 6, jobs=1)["generated"] == 0  # already there: nothing made again


def test_run_configs_compose_for_both_sources(tmp_path):
    from clipexp.config.compose import compose as compose_and_validate

    args = dataset_scale.parse_args(["--measure", "shards", "--pairs", str(tmp_path / "p.csv"), "--steps", "9",
                                     "--urls", '{"train": "/s/train-{000000..000079}.tar", "val": "/s/val-000000.tar"}'])
    cfg = compose_and_validate(dataset_scale.run_overrides(args))
    assert cfg.data.source == "webdataset" and cfg.data.urls == "/s/train-{000000..000079}.tar"
    assert cfg.trainer.max_steps == 9 and cfg.model.image_resolution == 160 and not cfg.tracking.enabled
    (tmp_path / "p.csv").write_text("image_path,caption\n")
    args = dataset_scale.parse_args(["--measure", "csv", "--pairs", str(tmp_path / "p.csv"), "--set", "data.cache_memory_mb=64"])
    cfg = compose_and_validate(dataset_scale.run_overrides(args))
    assert cfg.data.source == "csv" and cfg.data.path == str(tmp_path / "p.csv") and cfg.data.cache_memory_mb == 64
