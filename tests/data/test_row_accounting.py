"""Every row of a source is read or named: an unclosed quote in a CSV, extra fields, JSON items that would
lose a value, caption files that would be merged or dropped. Each case is a real file written here; the
property-based versions (random files) are in ``test_properties.py``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clipexp.data.loaders import DatasetLoader
from clipexp.data.problems import DataValidationError
from clipexp.errors import UserError

CLASSES = ("nominal", "local defect", "global defect")


def _textile_like_csv(root: Path, make_img, n_rows: int = 202, bad_line: int = 33) -> Path:
    """The issue's file: a header and ``n_rows`` rows over three classes (lines 2 .. n_rows + 1); the row on
    ``bad_line`` opens a quote it never closes."""
    for k in range(6):
        make_img(root / "images" / f"img_{k}.jpg", k, size=(16, 16))
    lines = ["image_path,caption,label"]
    for i in range(n_rows):
        label = CLASSES[i % 3]
        lines.append(f"images/img_{i % 6}.jpg,a photo of {label} fabric number {i},{label}")
    lines[bad_line - 1] = f"images/img_{(bad_line - 2) % 6}.jpg,\"an unclosed quote,nominal"
    path = root / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


UNCLOSED = ("a quote opened here is not closed before line 34, which holds another row ('images/img_2.jpg,a photo "
            "of global defect fabric number 32,global defect'); close the quote, or write a quote inside a quoted field as \"\"")


def refusal(read, *args, **kwargs) -> list:
    """The lines a reader's refusal names its rows with (a DataValidationError's lines after its first)."""
    with pytest.raises(DataValidationError) as exc:
        read(*args, **kwargs)
    return str(exc.value).splitlines()[1:]


def test_an_unclosed_quote_is_an_error_naming_its_line_not_a_swallowed_file(tmp_path, make_img):
    csv = _textile_like_csv(tmp_path, make_img)
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv)
    assert isinstance(exc.value, UserError)
    assert str(exc.value).splitlines() == [
        f'1 problem in {csv} (fix these rows, or set on_error="skip" / data.on_error=skip to drop them)',
        f"  {csv}:33: {UNCLOSED}",
    ]


def test_skip_drops_the_unclosed_row_and_still_reads_the_rows_it_would_swallow(tmp_path, make_img, caplog):
    csv = _textile_like_csv(tmp_path, make_img)
    with caplog.at_level(logging.WARNING, logger="clipexp.data.validation"):
        pairs = DatasetLoader.from_csv(csv, on_error="skip")
    # 202 data lines: 201 read + 1 reported, and the three classes all there
    assert len(pairs) == 201
    assert [p.source for p in pairs] == [f"{csv}:{n}" for n in range(2, 204) if n != 33]
    assert sorted({p.label for p in pairs}) == sorted(CLASSES)
    assert pairs[31].captions == ["a photo of global defect fabric number 32"] and pairs[31].source == f"{csv}:34"
    (record,) = caplog.records
    assert record.getMessage().splitlines() == [f"skipped 1 of 202 rows of {csv} (on_error=skip):", f"  {csv}:33: {UNCLOSED}"]


def test_a_quote_open_at_the_end_of_the_file_is_named(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    csv = tmp_path / "pairs.csv"
    csv.write_text('image_path,caption\na.jpg,a cat\na.jpg,"an open quote\n')
    assert refusal(DatasetLoader.from_csv, csv) == [
        f"  {csv}:3: a quote opened here is never closed (the file ends inside it); close the quote, or write a quote "
        "inside a quoted field as \"\""]


def test_a_quoted_caption_over_several_lines_is_one_row_when_no_line_of_it_is_a_row(tmp_path, make_img):
    """Valid CSV: a quoted field may hold line breaks; the row is reported by the line it starts on."""
    make_img(tmp_path / "a.jpg", 1)
    make_img(tmp_path / "b.jpg", 2)
    csv = tmp_path / "pairs.csv"
    csv.write_text('image_path,caption,label\na.jpg,"first line\nsecond line, with a comma\nthird ""quoted"" line",x\nb.jpg,plain,y\n')
    pairs = DatasetLoader.from_csv(csv)
    assert [(p.source, p.captions, p.label) for p in pairs] == [
        (f"{csv}:2", ['first line\nsecond line, with a comma\nthird "quoted" line'], "x"), (f"{csv}:5", ["plain"], "y")]


def test_the_quote_that_runs_away_is_named_by_its_own_line_after_a_closed_multiline_field(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    csv = tmp_path / "pairs.csv"
    # line 2 opens a row whose caption spans lines 2-3 (closed); its label opens a quote on line 3 that runs over line 4
    csv.write_text('image_path,caption,label\na.jpg,"two\nlines","label\na.jpg,next row,z\n')
    assert refusal(DatasetLoader.from_csv, csv) == [
        f"  {csv}:2: a quote opened on line 3 is not closed before line 4, which holds another row ('a.jpg,next row,z'); "
        "close the quote, or write a quote inside a quoted field as \"\""]
    assert [p.source for p in DatasetLoader.from_csv(csv, on_error="skip")] == [f"{csv}:4"]


def test_a_row_with_an_extra_field_is_named_never_silently_shifted(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    csv = tmp_path / "pairs.csv"
    # line 3: an unquoted comma in the caption would make 'sitting' its label; line 4: trailing empty fields carry nothing
    csv.write_text("image_path,caption,label\na.jpg,a cat,cat\na.jpg,a cat, sitting,cat\na.jpg,a dog,dog,,\n")
    assert refusal(DatasetLoader.from_csv, csv) == [
        f"  {csv}:3: 4 fields where the header has 3 (extra: 'cat'); quote a field that contains a comma, "
        'e.g. "a cat, sitting"']
    assert [(p.source, p.label) for p in DatasetLoader.from_csv(csv, on_error="skip")] == [(f"{csv}:2", "cat"), (f"{csv}:4", "dog")]


def test_a_tsv_row_with_an_extra_field_names_the_tab(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("image_path\tcaption\na.jpg\ta cat\ta second caption?\n")
    assert refusal(DatasetLoader.from_csv, tsv) == [
        f"  {tsv}:2: 3 fields where the header has 2 (extra: 'a second caption?'); quote a field that contains a tab"]


def test_a_header_naming_the_image_or_caption_column_twice_is_one_line(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("image_path,caption,caption\na.jpg,one,two\n")
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv)
    assert str(exc.value).splitlines() == [
        f"1 problem in {csv}",
        f"  {csv}:1: column 'caption' appears 2 times in the header (columns 2, 3); rename the others"]


def test_a_header_with_an_unclosed_quote_or_a_huge_field_is_one_line(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text('image_path,"caption\na.jpg,a cat\n')
    assert refusal(DatasetLoader.from_csv, csv) == [
        f"  {csv}:1: unreadable CSV header: a quote opened here is never closed (the file ends inside it); close the quote, "
        'or write a quote inside a quoted field as ""']
    csv.write_text("image_path,caption," + "x" * 200_000 + "\na.jpg,a cat\n")  # over csv's field size limit
    assert refusal(DatasetLoader.from_csv, csv) == [f"  {csv}:1: unreadable CSV header (field larger than field limit (131072))"]
    csv.write_text("image_path,caption\na.jpg,a cat\nb.jpg," + "x" * 200_000 + "\n")
    assert refusal(DatasetLoader.from_csv, csv) == [f"  {csv}:3: unreadable CSV (field larger than field limit (131072))"]


# --------------------------------------------------------------------------------------------- JSON


def test_json_item_with_a_key_twice_is_named_not_silently_the_last(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    js = tmp_path / "pairs.json"
    js.write_text('[\n {"image": "a.jpg", "caption": "one"},\n {"image": "a.jpg", "caption": "first", "caption": "second"}\n]\n')
    assert refusal(DatasetLoader.from_json, js) == [f"  {js}:3: key 'caption' appears 2 times in this item; keep one"]
    assert [p.source for p in DatasetLoader.from_json(js, on_error="skip")] == [f"{js}:2"]


def test_json_item_with_two_caption_keys_is_named(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    js = tmp_path / "pairs.json"
    js.write_text('[{"image": "a.jpg", "caption": "one", "captions": ["two", "three"]},\n'
                  ' {"image": "a.jpg", "file_name": "a.jpg", "caption": "x"}]\n')
    assert refusal(DatasetLoader.from_json, js) == [
        f"  {js}:1: keys 'captions' and 'caption' both hold captions; keep one (or put every caption in 'captions')",
        f"  {js}:2: keys 'image' and 'file_name' both name the image; keep one"]


def test_json_data_key_twice_is_one_line_not_the_first_list_lost(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    js = tmp_path / "pairs.json"
    js.write_text('{"data": [{"image": "a.jpg", "caption": "lost?"}],\n "data": [{"image": "a.jpg", "caption": "kept"}]}\n')
    assert refusal(DatasetLoader.from_json, js) == [f"  {js}:2: key 'data' appears 2 times (lines 1, 2); merge the lists into one"]


# ------------------------------------------------------------------------------------------- folders


def test_captions_txt_extra_field_and_a_name_relabelled_are_named(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    make_img(tmp_path / "b.jpg", 2)
    (tmp_path / "captions.txt").write_text("a.jpg\ta cat\tcat\na.jpg\tanother caption\tcat\nb.jpg\ta dog\tdog\textra\n"
                                           "a.jpg\ta third caption\tdog\n")
    txt = tmp_path / "captions.txt"
    assert refusal(DatasetLoader.from_directory, tmp_path) == [
        f"  {txt}:3: 4 fields where at most 3 are read (image name, caption, label; extra: 'extra'); a caption cannot hold a tab",
        f"  {txt}:4: image 'a.jpg' has label 'cat' on line 1 and 'dog' here; give an image one label",
    ]
    pairs = DatasetLoader.from_directory(tmp_path, on_error="skip")
    assert [(p.source, p.captions, p.label) for p in pairs] == [(f"{txt}:1", ["a cat", "another caption"], "cat")]


def test_a_caption_file_whose_image_is_missing_is_named(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    (tmp_path / "a.txt").write_text("a cat\n")
    (tmp_path / "b.txt").write_text("a dog whose image is gone\n")
    assert refusal(DatasetLoader.from_directory, tmp_path) == [
        f"  {tmp_path / 'b.txt'}: caption file with no image beside it (none of {', '.join('b' + e for e in _exts())})"]
    assert [p.captions for p in DatasetLoader.from_directory(tmp_path, on_error="skip")] == [["a cat"]]


def _exts():
    from clipexp.data.pairs import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


@pytest.mark.slow  # a fresh `python -m clipexp` (torch, transformers, Hydra): 29 s on the shared 2-core box
def test_the_cli_stops_on_the_unclosed_quote_with_its_line_before_any_mlflow_run(tmp_path, make_img, run_cli):
    csv = _textile_like_csv(tmp_path / "data", make_img)
    res = run_cli("model=tiny", "data=csv", f"data.path={csv}", "trainer.max_steps=2", timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-2:] == [
        f'clipexp: error: 1 problem in {csv} (fix these rows, or set on_error="skip" / data.on_error=skip to drop them)',
        f"  {csv}:33: {UNCLOSED}"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
