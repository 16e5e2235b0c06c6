"""Sources: CSV, JSON, folder, HF, textile -> pairs (counts, paths, labels, captions, groups)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipexp.data.loaders import DatasetLoader, load_pairs
from clipexp.data.pairs import ImageTextPair, assign_group_ids, normalize_caption
from clipexp.data.problems import DataValidationError


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ CSV
def test_csv_counts_relative_paths_labels_and_groups(image_root: Path):
    csv = write_csv(
        image_root / "pairs.csv",
        "image_path,caption,label\n"
        "a.jpg,A red square.,red\n"
        "b.png,a  red square,red\n"
        "sub/c.jpg,A blue circle!,blue\n"
        "d.jpg,a green thing,\n",
    )
    pairs = DatasetLoader.from_csv(csv)
    assert len(pairs) == 4
    assert [p.image_path for p in pairs] == [image_root / "a.jpg", image_root / "b.png", image_root / "sub" / "c.jpg", image_root / "d.jpg"]
    assert [p.captions for p in pairs] == [["A red square."], ["a  red square"], ["A blue circle!"], ["a green thing"]]
    assert [p.label for p in pairs] == ["red", "red", "blue", None]
    assert [p.group_id for p in pairs] == [0, 0, 1, 2]  # "A red square." == "a  red square" after normalising
    assert [p.source for p in pairs] == [f"{csv}:{n}" for n in (2, 3, 4, 5)]


def test_csv_relative_paths_resolve_against_the_csv_folder_not_the_cwd(image_root: Path, tmp_path: Path, monkeypatch):
    csv = write_csv(image_root / "pairs.csv", "image_path,caption\na.jpg,x\n")
    monkeypatch.chdir(tmp_path)
    (pair,) = DatasetLoader.from_csv(csv)
    assert pair.image_path == image_root / "a.jpg"


def test_relative_csv_path_gives_absolute_image_paths_and_keeps_the_given_name_in_sources(image_root: Path, monkeypatch):
    write_csv(image_root / "pairs.csv", "image_path,caption\nsub/../a.jpg,x\n")
    monkeypatch.chdir(image_root.parent)
    (pair,) = DatasetLoader.from_csv("imgs/pairs.csv")
    assert pair.image_path == image_root / "a.jpg" and pair.image_path.is_absolute()
    assert pair.source == "imgs/pairs.csv:2"


def test_csv_without_label_column_has_no_labels_and_custom_columns(image_root: Path):
    csv = write_csv(image_root / "p.csv", "file,text\na.jpg,one\nb.png,two\n")
    pairs = DatasetLoader.from_csv(csv, image_column="file", caption_column="text")
    assert [(p.image_path.name, p.caption, p.label) for p in pairs] == [("a.jpg", "one", None), ("b.png", "two", None)]


def test_csv_missing_column_names_the_columns_found(image_root: Path):
    csv = write_csv(image_root / "p.csv", "image_path,text\na.jpg,one\n")
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv)
    assert str(exc.value).splitlines() == [
        f"1 problem in {csv}",
        f"  {csv}:1: missing column 'caption' (columns: image_path, text)",
    ]


def test_csv_absolute_path_inside_root_is_fine_and_blank_lines_are_ignored(image_root: Path):
    csv = write_csv(image_root / "p.csv", f"image_path,caption\n\n{image_root / 'a.jpg'},one\n\nb.png,two\n")
    pairs = DatasetLoader.from_csv(csv)
    assert [p.source for p in pairs] == [f"{csv}:3", f"{csv}:5"]


def test_missing_source_file_is_one_clear_error(tmp_path: Path):
    with pytest.raises(DataValidationError, match="file not found"):
        DatasetLoader.from_csv(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------------------ JSON
def test_json_list_with_multi_captions_labels_and_line_numbers(image_root: Path):
    path = image_root / "pairs.json"
    path.write_text(
        "[\n"
        '  {"image": "a.jpg", "caption": "a cat", "label": "cat"},\n'
        '  {"image": "b.png", "captions": ["a dog", "a puppy"], "label": "dog"},\n'
        '  {\n    "image": "sub/c.jpg",\n    "caption": "A cat."\n  }\n'
        "]\n"
    )
    pairs = DatasetLoader.from_json(path)
    assert [(p.image_path.name, p.captions, p.label) for p in pairs] == [
        ("a.jpg", ["a cat"], "cat"),
        ("b.png", ["a dog", "a puppy"], "dog"),
        ("c.jpg", ["A cat."], None),
    ]
    assert [p.source for p in pairs] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert [p.group_id for p in pairs] == [0, 1, 0]


def test_json_data_wrapper(image_root: Path):
    path = image_root / "w.json"
    path.write_text(json.dumps({"version": 1, "data": [{"image": "a.jpg", "caption": "x"}, {"image": "d.jpg", "caption": "y"}]}, indent=1))
    pairs = DatasetLoader.from_json(path)
    assert [p.image_path for p in pairs] == [image_root / "a.jpg", image_root / "d.jpg"]
    assert [p.source.rsplit(":", 1)[1] for p in pairs] == ["4", "8"]


def test_json_problems_are_reported_by_line(image_root: Path):
    path = image_root / "bad.json"
    path.write_text(
        '[{"image": "a.jpg", "caption": "ok"},\n'
        ' {"caption": "no image"},\n'
        ' {"image": "b.png", "captions": ["fine", ""]},\n'
        ' {"image": "missing.jpg", "caption": "gone"},\n'
        ' "just a string"]\n'
    )
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_json(path)
    assert str(exc.value).splitlines()[1:] == [
        f"  {path}:2: missing key 'image'",
        f"  {path}:3: empty caption",
        f"  {path}:4: image 'missing.jpg' not found",
        f"  {path}:5: expected an object like {{\"image\": ..., \"caption\": ...}}, got str",
    ]


def test_json_syntax_error_names_the_line(image_root: Path):
    path = image_root / "broken.json"
    path.write_text('[\n {"image": "a.jpg", "caption": "x"},\n {"image": }\n]')
    with pytest.raises(DataValidationError, match=r"broken.json:3: invalid JSON"):
        DatasetLoader.from_json(path)


# ------------------------------------------------------------------------------------------------ folder
def test_folder_with_captions_txt(make_img, tmp_path: Path):
    root = tmp_path / "f"
    make_img(root / "x.jpg", 1)
    make_img(root / "y.png", 2, fmt="PNG")
    (root / "captions.txt").write_text("x.jpg\tA photo of x\ny.png\tsecond image\tcls\nx.jpg\tanother caption of x\n")
    pairs = DatasetLoader.from_directory(root)
    assert [(p.image_path.name, p.captions, p.label) for p in pairs] == [
        ("x.jpg", ["A photo of x", "another caption of x"], None),
        ("y.png", ["second image"], "cls"),
    ]
    assert pairs[0].source == f"{root / 'captions.txt'}:1"


def test_folder_with_one_txt_per_image_reports_images_without_captions(make_img, tmp_path: Path):
    root = tmp_path / "f"
    make_img(root / "x.jpg", 1)
    make_img(root / "y.jpg", 2)
    make_img(root / "z.jpg", 3)
    (root / "x.txt").write_text("a caption for x\n")
    (root / "y.txt").write_text("first\n\nsecond\n")
    pairs, = [DatasetLoader.from_directory(root, on_error="skip")]
    assert [(p.image_path.name, p.captions) for p in pairs] == [("x.jpg", ["a caption for x"]), ("y.jpg", ["first", "second"])]
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_directory(root)
    assert str(exc.value).splitlines()[1:] == [f"  {root / 'z.jpg'}: no caption file 'z.txt'"]


def test_folder_with_class_subfolders_uses_the_first_template(make_img, tmp_path: Path):
    root = tmp_path / "f"
    make_img(root / "local defect" / "1.jpg", 1)
    make_img(root / "local defect" / "2.jpg", 2)
    make_img(root / "nominal" / "deep" / "3.png", 3, fmt="PNG")
    pairs = DatasetLoader.from_directory(root, prompt_templates=["an inspection image of {}.", "unused {}"])
    assert [(p.image_path.name, p.label, p.caption) for p in pairs] == [
        ("1.jpg", "local defect", "an inspection image of local defect."),
        ("2.jpg", "local defect", "an inspection image of local defect."),
        ("3.png", "nominal", "an inspection image of nominal."),
    ]
    assert [p.group_id for p in pairs] == [0, 0, 1]
    assert DatasetLoader.from_directory(root)[0].caption == "a photo of local defect."


def test_empty_folder_says_which_layouts_are_expected(tmp_path: Path):
    (tmp_path / "e").mkdir()
    with pytest.raises(DataValidationError, match="no captions.txt, no per-image .txt caption files, and no class sub-folders"):
        DatasetLoader.from_directory(tmp_path / "e")


# ------------------------------------------------------------------------------------------------ HF
def test_hf_saved_dataset_with_image_column_and_classlabel(tmp_path: Path, image_root: Path, cache_dir: Path):
    import datasets

    feats = datasets.Features({
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "cls": datasets.ClassLabel(names=["cat", "dog"]),
    })
    ds = datasets.Dataset.from_dict(
        {"image": [str(image_root / "a.jpg"), str(image_root / "b.png"), str(image_root / "a.jpg")],
         "text": ["a cat", "a dog", "a cat again"], "cls": [0, 1, 0]},
        features=feats,
    )
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(saved))

    pairs = DatasetLoader.from_hf(saved, image_column="image", caption_column="text", label_column="cls",
                                  split="train", cache_dir=cache_dir)
    assert [(p.caption, p.label) for p in pairs] == [("a cat", "cat"), ("a dog", "dog"), ("a cat again", "cat")]
    # save_to_disk embeds the image bytes: they are written once into the cache folder
    assert all(p.image_path.is_file() and p.image_path.parent.parent == cache_dir / "hf" for p in pairs)
    assert pairs[0].image_path == pairs[2].image_path  # same bytes -> one file
    assert pairs[0].image_path.read_bytes() == (image_root / "a.jpg").read_bytes()
    assert [p.source for p in pairs] == [f"{saved}[train]:{i}" for i in range(3)]
    test = DatasetLoader.from_hf(saved, image_column="image", caption_column="text", label_column="cls",
                                 split="test", cache_dir=cache_dir)
    assert [(p.caption, p.label) for p in test] == [("a dog", "dog")]
    with pytest.raises(DataValidationError, match=r"no split 'val' \(splits: train, test\)"):
        DatasetLoader.from_hf(saved, caption_column="text", split="val", cache_dir=cache_dir)


def test_hf_embedded_bytes_are_written_once_and_corrupt_bytes_reported(tmp_path: Path, image_root: Path, cache_dir: Path):
    import datasets

    good = (image_root / "a.jpg").read_bytes()
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": good[: len(good) // 3], "path": None}],
         "caption": ["good", "cut"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    saved = tmp_path / "bytes_ds"
    ds.save_to_disk(str(saved))
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_hf(saved, cache_dir=cache_dir)
    lines = str(exc.value).splitlines()
    assert lines[0].startswith(f"1 problem in {saved}[train]")
    assert lines[1].startswith(f"  {saved}[train]:1: image '{cache_dir}") and "is truncated or corrupt" in lines[1]
    (pair,) = DatasetLoader.from_hf(saved, cache_dir=cache_dir, on_error="skip")
    assert pair.image_path.read_bytes() == good and pair.image_path.suffix == ".jpg"
    files = sorted((cache_dir / "hf").rglob("*.jpg"))
    assert len(files) == 2


def test_hf_string_paths_resolve_against_the_saved_folder(make_img, tmp_path: Path):
    import datasets

    saved = tmp_path / "paths_ds"
    ds = datasets.Dataset.from_dict({"file": ["img/p.jpg", "../escape.jpg"], "caption": ["inside", "outside"]})
    ds.save_to_disk(str(saved))
    make_img(saved / "img" / "p.jpg", 1)
    make_img(tmp_path / "escape.jpg", 2)
    assert [p.image_path for p in DatasetLoader.from_hf(saved, image_column="file")] == [saved / "img" / "p.jpg", tmp_path / "escape.jpg"]
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_hf(saved, image_column="file", allow_outside_root=False)
    assert str(exc.value).splitlines()[1] == (f"  {saved}[train]:1: image '../escape.jpg' is outside the dataset root {saved}; "
                                              "set data.allow_outside_root=true to read images outside it")
    (pair,) = DatasetLoader.from_hf(saved, image_column="file", on_error="skip", allow_outside_root=False)
    assert pair.image_path == saved / "img" / "p.jpg"


# ------------------------------------------------------------------------------------------------ factory
def test_load_pairs_dispatches_on_source(image_root: Path, tmp_path: Path):
    csv = write_csv(image_root / "pairs.csv", "image_path,caption,label\na.jpg,one,x\nb.png,two,y\nd.jpg,three,x\n")
    jsn = image_root / "pairs.json"
    jsn.write_text('[{"image": "a.jpg", "caption": "one"}]')
    assert len(load_pairs({"source": "csv", "path": str(csv)})) == 3
    # json with DataConfig's defaults (image_column=image_path) still finds "image"
    assert len(load_pairs({"source": "json", "path": str(jsn), "image_column": "image_path", "caption_column": "caption"})) == 1
    assert [p.label for p in load_pairs({"source": "csv", "path": str(csv), "label_column": None})] == [None, None, None]
    two = load_pairs({"source": "csv", "path": str(csv), "max_samples": 2}, seed=0)
    assert len(two) == 2 and {p.label for p in two} == {"x", "y"}  # stratified subsample keeps both classes
    with pytest.raises(ValueError, match="data.path is required"):
        load_pairs({"source": "csv", "path": None})


def test_group_normalisation_rules():
    assert normalize_caption("  A  Red\tSquare!! ") == "a red square"
    assert normalize_caption("a red square.") == "a red square"
    assert normalize_caption("a red square?") == normalize_caption("A RED SQUARE")
    pairs = assign_group_ids([ImageTextPair(Path(f"{i}.jpg"), c) for i, c in
                              enumerate(["b.", "a", "B", "c", ["a.", "other"]])])
    assert [p.group_id for p in pairs] == [0, 1, 0, 2, 1]  # multi-caption: first caption's group
