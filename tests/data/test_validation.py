"""Validation before training: every problem reported at once, with file and line; skip mode; root."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from clipexp.data.dataset import CLIPDataset
from clipexp.data.images import ImageDecodeError, decode_image_file
from clipexp.data.loaders import DatasetLoader
from clipexp.data.problems import DataValidationError

BAD_CSV = (
    "image_path,caption,label\n"
    "a.jpg,a good image,x\n"  # 2 ok
    "missing.jpg,a missing image,x\n"  # 3
    "b.png,,y\n"  # 4 empty caption
    "trunc.jpg,a truncated jpeg,x\n"  # 5
    "empty.jpg,a zero-byte file,y\n"  # 6
    "text.jpg,a text file named .jpg,x\n"  # 7
    "../outside.jpg,an image outside the root,y\n"  # 8
    "sub,a folder,x\n"  # 9
    ",no image path,x\n"  # 10
    "d.jpg,another good one,y\n"  # 11 ok
)


OPT_IN = "; set data.allow_outside_root=true to read images outside it"


@pytest.fixture
def bad_csv(image_root: Path) -> Path:
    path = image_root / "pairs.csv"
    path.write_text(BAD_CSV)
    return path


def expected_lines(csv: Path, root: Path):
    return [
        f"  {csv}:3: image 'missing.jpg' not found",
        f"  {csv}:4: empty caption",
        re.compile(re.escape(f"  {csv}:5: image 'trunc.jpg' is truncated or corrupt (") + r".+\)"),
        f"  {csv}:6: image 'empty.jpg' is empty (0 bytes)",
        f"  {csv}:7: image 'text.jpg' is not an image file (cannot identify image format)",
        f"  {csv}:8: image '../outside.jpg' is outside the dataset root {root}{OPT_IN}",
        f"  {csv}:9: image 'sub' is a directory, not an image file",
        f"  {csv}:10: empty image_path",
    ]


def test_report_names_every_bad_row_with_file_and_line(bad_csv: Path, image_root: Path):
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(bad_csv, allow_outside_root=False)
    err = exc.value
    assert isinstance(err, ValueError)
    lines = str(err).splitlines()
    assert lines[0] == f'8 problems in {bad_csv} (fix these rows, or set on_error="skip" / data.on_error=skip to drop them)'
    assert len(lines) == 9
    for line, want in zip(lines[1:], expected_lines(bad_csv, image_root)):
        assert want.fullmatch(line) if isinstance(want, re.Pattern) else line == want, line
    assert [p.where for p in err.problems] == [f"{bad_csv}:{n}" for n in range(3, 11)]


def test_skip_mode_drops_bad_rows_and_logs_them(bad_csv: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="clipexp.data.validation"):
        pairs = DatasetLoader.from_csv(bad_csv, on_error="skip", allow_outside_root=False)
    assert [p.source for p in pairs] == [f"{bad_csv}:2", f"{bad_csv}:11"]
    assert [p.group_id for p in pairs] == [0, 1]
    (record,) = caplog.records
    msg = record.getMessage()
    assert msg.startswith(f"skipped 8 of 10 rows of {bad_csv} (on_error=skip):")
    assert f"{bad_csv}:3: image 'missing.jpg' not found" in msg and f"{bad_csv}:10: empty image_path" in msg


def test_skip_mode_raises_when_nothing_is_left(image_root: Path):
    csv = image_root / "allbad.csv"
    csv.write_text("image_path,caption\nmissing.jpg,x\nempty.jpg,y\n")
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv, on_error="skip")
    lines = str(exc.value).splitlines()
    assert lines == [
        f"2 problems in {csv}",
        f"  {csv}:2: image 'missing.jpg' not found",
        f"  {csv}:3: image 'empty.jpg' is empty (0 bytes)",
        f"no usable rows are left in {csv} after skipping these",
    ]


def test_outside_root_absolute_path_refused_when_asked_naming_the_key(image_root: Path, tmp_path: Path):
    outside = tmp_path / "outside.jpg"
    csv = image_root / "abs.csv"
    csv.write_text(f"image_path,caption\n{outside},absolute elsewhere\nsub/../a.jpg,dotdot that stays inside\n")
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv, allow_outside_root=False)
    assert str(exc.value).splitlines()[1:] == [f"  {csv}:2: image '{outside}' is outside the dataset root {image_root}{OPT_IN}"]
    pairs = DatasetLoader.from_csv(csv, allow_outside_root=True)
    assert [p.image_path for p in pairs] == [outside, image_root / "a.jpg"]


def test_images_kept_elsewhere_are_read_by_default(tmp_path: Path, make_img, compose_cfg):
    """The common layout (issue 31, item 10): the images in /data/images, listed by absolute path (or ``../``) from a
    CSV in a project folder. A user's own CSV is no trust boundary (the served model is: serve_file_root), so the
    library, ``load_pairs`` and the run config all read them unless ``allow_outside_root`` is false."""
    from clipexp.data.loaders import load_pairs

    images, project = tmp_path / "data" / "images", tmp_path / "project"
    a, b = make_img(images / "a.jpg", 1), make_img(images / "b.jpg", 2)
    project.mkdir()
    csv = project / "pairs.csv"
    csv.write_text(f"image_path,caption\n{a},absolute elsewhere\n../data/images/b.jpg,relative elsewhere\n")
    assert [p.image_path for p in DatasetLoader.from_csv(csv)] == [a, b]
    cfg = compose_cfg("data=csv", f"data.path={csv}")
    assert cfg.data.allow_outside_root is True
    assert [p.image_path for p in load_pairs(cfg.data)] == [a, b]
    with pytest.raises(DataValidationError) as exc:
        load_pairs({**cfg.data, "allow_outside_root": False})
    assert str(exc.value).splitlines()[1:] == [f"  {csv}:2: image '{a}' is outside the dataset root {project}{OPT_IN}",
                                               f"  {csv}:3: image '../data/images/b.jpg' is outside the dataset root {project}{OPT_IN}"]


def test_invalid_on_error_value(bad_csv: Path):
    with pytest.raises(ValueError, match="on_error='ignore' is invalid: one of raise, skip"):
        DatasetLoader.from_csv(bad_csv, on_error="ignore")


@pytest.mark.parametrize(
    "name, reason",
    [("missing.jpg", "not found"), ("empty.jpg", "is empty (0 bytes)"),
     ("text.jpg", "is not an image file (cannot identify image format)")],
)
def test_decode_reasons(image_root: Path, name: str, reason: str):
    with pytest.raises(ImageDecodeError) as exc:
        decode_image_file(image_root / name)
    assert exc.value.reason == reason


def test_truncated_jpeg_is_caught_by_full_decode_though_pil_verify_passes(image_root: Path):
    from PIL import Image

    with Image.open(image_root / "trunc.jpg") as im:
        im.verify()  # header-level check: does not notice the missing half
    with pytest.raises(ImageDecodeError, match="is truncated or corrupt"):
        decode_image_file(image_root / "trunc.jpg")


def test_image_broken_after_loading_raises_data_validation_error_naming_the_file(image_root: Path, processor):
    csv = image_root / "ok.csv"
    csv.write_text("image_path,caption\na.jpg,one\nd.jpg,two\n")
    ds = CLIPDataset(DatasetLoader.from_csv(csv), processor)
    assert ds[1]["pixel_values"].shape == (3, 32, 32)
    (image_root / "d.jpg").write_bytes((image_root / "d.jpg").read_bytes()[:200])
    with pytest.raises(DataValidationError) as exc:
        ds[1]
    msg = str(exc.value)
    assert msg.startswith(f"{csv}:3: image '{image_root / 'd.jpg'}' is truncated or corrupt (")
    assert msg.endswith("(it passed validation when the data was loaded: the file was changed or removed since)")
    (image_root / "d.jpg").unlink()
    with pytest.raises(DataValidationError, match=re.escape(f"{csv}:3: image '{image_root / 'd.jpg'}' not found")):
        ds[1]


def test_image_broken_during_training_raises_data_validation_error_from_a_worker(image_root: Path, processor):
    from clipexp.data.dataloader import create_dataloader

    csv = image_root / "ok.csv"
    csv.write_text("image_path,caption\na.jpg,one\nd.jpg,two\n")
    ds = CLIPDataset(DatasetLoader.from_csv(csv), processor)
    (image_root / "d.jpg").write_bytes(b"")
    loader = create_dataloader(ds, batch_size=2, shuffle=False, num_workers=1)
    with pytest.raises(DataValidationError, match=re.escape(f"{csv}:3: image '{image_root / 'd.jpg'}' is empty (0 bytes)")):
        next(iter(loader))
