"""File sources -> candidate rows: a CSV/TSV file, a JSON file, a folder (see :mod:`clipexp.data.loaders`
for the keywords every reader takes, and :mod:`clipexp.data.validation` for what happens to the rows).

Relative image paths resolve against the folder of the CSV/JSON file (the *dataset root*). Rows are
reported by file line: the header is line 1 of a CSV, a JSON item is reported by the line it starts on.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from clipexp.data.pairs import IMAGE_EXTENSIONS, ImageTextPair
from clipexp.data.problems import DataValidationError, Problem, one_problem
from clipexp.data.validation import Candidate, check_on_error, clean_captions, finalize_with, resolve_image

PathLike = Union[str, Path]
Result = Tuple[List[ImageTextPair], List[Problem]]

JSON_IMAGE_KEYS = ("image", "image_path", "file_name", "filename", "path")
JSON_CAPTION_KEYS = ("captions", "caption", "text")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise one_problem(path, str(path), "file not found" if not path.exists() else "not a file")


def read_text(path: Path) -> str:
    """A text file decoded as UTF-8 (a byte-order mark is dropped); other bytes are one named error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise one_problem(path, f"{path}:{line}", f"not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8 "
                    f"(e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name})") from None


def _looks_like_data(cells: Sequence[str]) -> bool:
    """A first CSV line that names an image file is a row, not a header."""
    return any(c.strip().lower().endswith(IMAGE_EXTENSIONS) for c in cells)


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------


def read_csv(
    path: PathLike,
    image_column: str = "image_path",
    caption_column: str = "caption",
    label_column: Optional[str] = "label",
    **opts: Any,
) -> Result:
    """CSV (``.tsv``: tab-separated) with a header row. Rows are reported by line (header = line 1)."""
    path = Path(path)
    _require_file(path)
    check_on_error(opts.get("on_error", "raise"))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    cands: List[Candidate] = []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise one_problem(path, f"{path}:1", f"unreadable CSV header ({err})") from None
        if not header:
            raise one_problem(path, f"{path}:1", "empty file: expected a header row with columns "
                        f"'{image_column}' and '{caption_column}'")
        header = [h.strip() for h in header]
        missing = [c for c in (image_column, caption_column) if c not in header]
        if len(missing) == 2 and _looks_like_data(header):
            columns = ",".join(c for c in (image_column, caption_column, label_column) if c)
            raise one_problem(path, f"{path}:1", f"no header row (line 1 is data: {delimiter.join(header)[:60]!r}); add a first "
                        f"line naming the columns, e.g. {columns}")
        if missing:
            problems = [Problem(f"{path}:1", f"missing column '{c}' (columns: {', '.join(header)})") for c in missing]
            raise DataValidationError.from_problems(path, problems, hint=False)
        ii, ci = header.index(image_column), header.index(caption_column)
        li = header.index(label_column) if label_column and label_column in header else None
        prev = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise one_problem(path, f"{path}:{reader.line_num}", f"unreadable CSV ({err})") from None
            line, prev = prev + 1, reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            cell = lambda i: row[i] if i is not None and i < len(row) else ""  # noqa: E731
            raw = cell(ii).strip()
            caps, empty = clean_captions([cell(ci)])
            c = Candidate(line, f"{path}:{line}", raw or None, resolve_image(raw, path.parent) if raw else None, caps,
                          cell(li).strip() or None)
            if not raw:
                c.problems.append(f"empty {image_column}")
            if empty:
                c.problems.append("empty caption")
            cands.append(c)
    if not cands:
        raise one_problem(path, f"{path}:1", f"no rows after the header; add one line per image ({image_column},{caption_column})")
    return finalize_with(cands, path, path.parent, opts)


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def json_items_with_lines(text: str) -> Tuple[List[Tuple[Any, int]], Any]:
    """Parse a JSON list (or ``{"data": [...]}``) and return ``([(item, line), ...], whole)``.

    ``line`` is the 1-based line where each item starts. Raises ``json.JSONDecodeError`` /
    ``ValueError`` for invalid JSON or another top-level shape.
    """
    whole = json.loads(text)
    dec = json.JSONDecoder()
    if isinstance(whole, list):
        pos = _skip_ws(text, 0)
    elif isinstance(whole, dict) and isinstance(whole.get("data"), list):
        i = _skip_ws(text, 0) + 1
        pos = -1
        while True:
            i = _skip_ws(text, i)
            if text[i] == "}":
                break
            key, i = json.decoder.scanstring(text, i + 1)
            i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
            if key == "data":
                pos = i
            _, i = dec.raw_decode(text, i)
            i = _skip_ws(text, i)
            if text[i] == ",":
                i += 1
    else:
        raise ValueError('expected a list of {"image": ..., "caption": ...} objects, or {"data": [...]}')
    items: List[Tuple[Any, int]] = []
    i, line, last = pos + 1, 1 + text.count("\n", 0, pos), pos
    while True:
        i = _skip_ws(text, i)
        if text[i] == "]":
            break
        line += text.count("\n", last, i)
        last = i
        obj, i = dec.raw_decode(text, i)
        items.append((obj, line))
        i = _skip_ws(text, i)
        if text[i] == ",":
            i += 1
    return items, whole


def read_json(
    path: PathLike,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    label_column: Optional[str] = "label",
    **opts: Any,
) -> Result:
    """JSON list of objects (or ``{"data": [...]}``); each item reported by the line it starts on.

    Keys: the image under ``image_column`` or the first of ``image``, ``image_path``, ``file_name``,
    ``filename``, ``path``; the caption(s) under ``caption_column`` or ``captions`` (a list),
    ``caption``, ``text``; an optional ``label_column`` (``label``).
    """
    path = Path(path)
    _require_file(path)
    check_on_error(opts.get("on_error", "raise"))
    text = read_text(path)
    try:
        items, _ = json_items_with_lines(text)
    except json.JSONDecodeError as err:
        raise one_problem(path, f"{path}:{err.lineno}", f"invalid JSON ({err.msg}, column {err.colno})") from None
    except ValueError as err:
        raise one_problem(path, str(path), str(err)) from None
    image_keys = tuple(dict.fromkeys(([image_column] if image_column else []) + list(JSON_IMAGE_KEYS)))
    caption_keys = tuple(dict.fromkeys(([caption_column] if caption_column else []) + list(JSON_CAPTION_KEYS)))
    cands: List[Candidate] = []
    for n, (obj, line) in enumerate(items):
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            cands.append(Candidate(n, where, None, None, [], None,
                                   [f'expected an object like {{"image": ..., "caption": ...}}, got {type(obj).__name__}']))
            continue
        c = Candidate(n, where, None, None, [], None)
        ikey = next((k for k in image_keys if k in obj), None)
        raw = obj.get(ikey) if ikey else None
        if ikey is None:
            c.problems.append(f"missing key '{image_keys[0]}'")
        elif not isinstance(raw, str) or not raw.strip():
            c.problems.append(f"empty {ikey}" if not raw else f"'{ikey}' must be a path string")
        else:
            c.raw_image = raw.strip()
            c.image_path = resolve_image(c.raw_image, path.parent)
        ckey = next((k for k in caption_keys if k in obj), None)
        if ckey is None:
            c.problems.append(f"missing key '{'caption' if caption_column is None else caption_column}'")
        else:
            value = obj[ckey]
            caps, empty = clean_captions(value if isinstance(value, list) else [value])
            c.captions = caps
            if empty:
                c.problems.append("empty caption")
        lab = obj.get(label_column) if label_column else None
        c.label = None if lab is None or str(lab).strip() == "" else str(lab).strip()
        cands.append(c)
    return finalize_with(cands, path, path.parent, opts)


# --------------------------------------------------------------------------------------------------
# A folder
# --------------------------------------------------------------------------------------------------


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def read_directory(path: PathLike, prompt_templates: Optional[Sequence[str]] = None, **opts: Any) -> Result:
    """A folder in one of three layouts, tried in this order:

    1. ``captions.txt``: one ``name<TAB>caption[<TAB>label]`` per line (name relative to the folder;
       a name on several lines gets several captions);
    2. one ``<image stem>.txt`` per image (each non-empty line is a caption);
    3. class sub-folders ``root/<label>/*.jpg`` (searched recursively): label = folder name, caption =
       ``prompt_templates[0].format(label)`` (default ``"a photo of {}."``).
    """
    root = Path(path).absolute()
    if not root.is_dir():
        raise one_problem(root, str(root), "folder not found" if not root.exists() else "not a folder")
    check_on_error(opts.get("on_error", "raise"))
    captions_file = root / "captions.txt"
    if captions_file.is_file():
        return finalize_with(_captions_file_rows(captions_file, root), captions_file, root, opts)
    images = sorted(p for p in root.iterdir() if _is_image(p))
    if any(p.with_suffix(".txt").is_file() for p in images):
        return finalize_with(_caption_file_per_image_rows(images), root, root, opts)
    cands = _class_folder_rows(root, prompt_templates)
    if not cands:
        raise one_problem(root, str(root), "no captions.txt, no per-image .txt caption files, and no class sub-folders "
                    f"with images ({', '.join(IMAGE_EXTENSIONS)})")
    return finalize_with(cands, root, root, opts)


def _captions_file_rows(captions_file: Path, root: Path) -> List[Candidate]:
    cands: List[Candidate] = []
    by_name: Dict[str, Candidate] = {}
    for line_no, line in enumerate(read_text(captions_file).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{captions_file}:{line_no}"
        parts = line.split("\t")
        if len(parts) < 2:
            cands.append(Candidate(line_no, where, None, None, [], None, ["expected 'image name<TAB>caption'"]))
            continue
        name = parts[0].strip()
        caps, empty = clean_captions([parts[1]])
        label = parts[2].strip() or None if len(parts) > 2 else None
        if not name:
            cands.append(Candidate(line_no, where, None, None, [], None, ["empty image name"]))
            continue
        if name in by_name and not empty:
            by_name[name].captions += caps
            continue
        c = Candidate(line_no, where, name, resolve_image(name, root), caps, label)
        if empty:
            c.problems.append("empty caption")
        by_name.setdefault(name, c)
        cands.append(c)
    return cands


def _caption_file_per_image_rows(images: Sequence[Path]) -> List[Candidate]:
    cands: List[Candidate] = []
    for n, img in enumerate(images):
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            cands.append(Candidate(n, str(img), img.name, img, [], None, [f"no caption file '{txt.name}'"]))
            continue
        caps, _ = clean_captions([line for line in read_text(txt).splitlines() if line.strip()] or [""])
        c = Candidate(n, str(txt), img.name, img, caps, None)
        if not caps:
            c.problems.append("empty caption")
        cands.append(c)
    return cands


def _class_folder_rows(root: Path, prompt_templates: Optional[Sequence[str]]) -> List[Candidate]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    template = (list(prompt_templates) if prompt_templates else ["a photo of {}."])[0]
    cands: List[Candidate] = []
    for d in classes:
        for img in sorted(p for p in d.rglob("*") if _is_image(p)):
            rel = str(img.relative_to(root))
            cands.append(Candidate(len(cands), str(img), rel, img, [template.format(d.name)], d.name))
    return cands
