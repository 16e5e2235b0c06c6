"""File sources -> candidate rows: a CSV/TSV file, a JSON file, a folder (see :mod:`clipexp.data.loaders`
for the keywords every reader takes, and :mod:`clipexp.data.validation` for what happens to the rows).

Relative image paths resolve against the folder of the CSV/JSON file (the *dataset root*). Rows are
reported by file line: the header is line 1 of a CSV, a JSON item is reported by the line it starts on.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from clipexp.data.csv_records import CSVSyntaxError, first_cells, read_records, split_lines
from clipexp.data.pairs import IMAGE_EXTENSIONS, ImageTextPair
from clipexp.data.problems import DataValidationError, Problem, one_problem
from clipexp.data.validation import Candidate, check_on_error, clean_captions, finalize_with, resolve_image
from clipexp.errors import UserError

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
    """CSV (``.tsv``: tab-separated) with a header row. Rows are reported by line (header = line 1).

    Every physical line is accounted for (:mod:`clipexp.data.csv_records`): a row is read, or named in the
    report (a quote that runs over the next rows, more fields than the header, ...), or blank."""
    path = Path(path)
    _require_file(path)
    check_on_error(opts.get("on_error", "raise"))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    lines = split_lines(read_text(path))
    try:
        header_rec = next(read_records(lines, 0, delimiter, lambda line: False), None)
    except CSVSyntaxError as err:
        raise one_problem(path, f"{path}:1", f"unreadable CSV header ({err})") from None
    if header_rec is not None and header_rec.problem:
        raise one_problem(path, f"{path}:1", f"unreadable CSV header: {header_rec.problem}")
    if header_rec is None or not header_rec.cells:
        raise one_problem(path, f"{path}:1", "empty file: expected a header row with columns "
                    f"'{image_column}' and '{caption_column}'")
    header = [h.strip() for h in header_rec.cells]
    ii, ci, li = _csv_columns(path, header, delimiter, image_column, caption_column, label_column)
    root = path.parent

    def is_row(line: str) -> bool:
        """A line that names an image is a row of its own, not a caption's next line: its image cell read by the
        CSV rules, or split plainly (a row that opens a quote of its own: '"a.jpg,caption')."""
        cells, plain = first_cells(line, delimiter), line.split(delimiter)
        for raw in (cells[ii] if ii < len(cells) else "", plain[ii].strip().strip('"') if ii < len(plain) else ""):
            raw = raw.strip()
            if raw and (raw.lower().endswith(IMAGE_EXTENSIONS) or resolve_image(raw, root).is_file()):
                return True
        return False

    cands: List[Candidate] = []
    try:
        for rec in read_records(lines, header_rec.end, delimiter, is_row):
            where = f"{path}:{rec.line}"
            if rec.problem:
                cands.append(Candidate(rec.line, where, None, None, [], None, [rec.problem]))
                continue
            row = rec.cells
            if not row or all(not c.strip() for c in row):
                continue
            cell = lambda i: row[i] if i is not None and i < len(row) else ""  # noqa: E731
            raw = cell(ii).strip()
            caps, empty = clean_captions([cell(ci)])
            c = Candidate(rec.line, where, raw or None, resolve_image(raw, root) if raw else None, caps, cell(li).strip() or None)
            extra = [x for x in row[len(header):] if x.strip()]
            if extra:
                c.problems.append(_extra_fields(row, len(header), ci, delimiter))
            if not raw:
                c.problems.append(f"empty {image_column}")
            if empty:
                c.problems.append("empty caption")
            cands.append(c)
    except CSVSyntaxError as err:
        raise one_problem(path, f"{path}:{err.line}", f"unreadable CSV ({err})") from None
    if not cands:
        raise one_problem(path, f"{path}:1", f"no rows after the header; add one line per image ({image_column},{caption_column})")
    return finalize_with(cands, path, root, opts)


def _csv_columns(path: Path, header: List[str], delimiter: str, image_column: str, caption_column: str,
                 label_column: Optional[str]) -> Tuple[int, int, Optional[int]]:
    """The indices of the image, caption and label (None: absent) columns in ``header``, or one error."""
    missing = [c for c in (image_column, caption_column) if c not in header]
    if len(missing) == 2 and _looks_like_data(header):
        columns = ",".join(c for c in (image_column, caption_column, label_column) if c)
        raise one_problem(path, f"{path}:1", f"no header row (line 1 is data: {delimiter.join(header)[:60]!r}); add a first "
                    f"line naming the columns, e.g. {columns}")
    if missing:
        problems = [Problem(f"{path}:1", f"missing column '{c}' (columns: {', '.join(header)})") for c in missing]
        raise DataValidationError.from_problems(path, problems, hint=False)
    for name in (image_column, caption_column, label_column):
        at = [str(k + 1) for k, h in enumerate(header) if name and h == name]
        if len(at) > 1:
            raise one_problem(path, f"{path}:1", f"column '{name}' appears {len(at)} times in the header (columns {', '.join(at)}); "
                              "rename the others")
    li = header.index(label_column) if label_column and label_column in header else None
    return header.index(image_column), header.index(caption_column), li


def _extra_fields(row: Sequence[str], n_header: int, ci: int, delimiter: str) -> str:
    """A row with more fields than the header: the fields past the header's, and the likely cause (a caption
    holding the delimiter: the example re-joins the caption with as many following fields as are extra)."""
    extra = ", ".join(repr(x.strip()) for x in row[n_header:] if x.strip())
    message = f"{len(row)} fields where the header has {n_header} (extra: {extra}); quote a field that contains a "
    if delimiter == "\t":
        return message + "tab"
    caption = ",".join(row[ci:ci + len(row) - n_header + 1]).strip()
    return message + "comma" + (f', e.g. "{caption}"' if caption.strip(",") else "")


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


class JSONShapeError(UserError, ValueError):
    """A JSON file whose shape would lose items; ``line`` (1-based) is where, when known."""

    def __init__(self, message: str, line: Optional[int] = None):
        self.line = line
        super().__init__(message)


class JSONObject(dict):
    """A decoded JSON object that remembers the keys it held more than once (``duplicates``: ``{key: count}``),
    whose earlier values ``json`` drops silently."""

    duplicates: Dict[str, int] = {}


def _object(pairs: List[Tuple[str, Any]]) -> JSONObject:
    obj = JSONObject(pairs)
    if len(obj) < len(pairs):
        counts: Dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        obj.duplicates = {k: n for k, n in counts.items() if n > 1}
    return obj


def json_items_with_lines(text: str) -> Tuple[List[Tuple[Any, int]], Any]:
    """Parse a JSON list (or ``{"data": [...]}``) and return ``([(item, line), ...], whole)``.

    ``line`` is the 1-based line where each item starts; objects are :class:`JSONObject` (duplicate keys
    noted). Raises ``json.JSONDecodeError`` for invalid JSON, :class:`JSONShapeError` for another top-level
    shape or a ``data`` key given twice (``json`` would keep the last list only).
    """
    whole = json.loads(text, object_pairs_hook=_object)
    dec = json.JSONDecoder(object_pairs_hook=_object)
    if isinstance(whole, list):
        pos = _skip_ws(text, 0)
    elif isinstance(whole, dict) and isinstance(whole.get("data"), list):
        i = _skip_ws(text, 0) + 1
        pos, data_lines = -1, []
        while True:
            i = _skip_ws(text, i)
            if text[i] == "}":
                break
            key, i = json.decoder.scanstring(text, i + 1)
            i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
            if key == "data":
                pos = i
                data_lines.append(1 + text.count("\n", 0, i))
            _, i = dec.raw_decode(text, i)
            i = _skip_ws(text, i)
            if text[i] == ",":
                i += 1
        if len(data_lines) > 1:
            raise JSONShapeError(f"key 'data' appears {len(data_lines)} times (lines {', '.join(map(str, data_lines))}); "
                                 "merge the lists into one", data_lines[-1])
    else:
        raise JSONShapeError('expected a list of {"image": ..., "caption": ...} objects, or {"data": [...]}')
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
    """JSON list of objects (or ``{"data": [...]}``); each item reported by the line it starts on (and its
    1-based place in the list, ``file:1 (item 7)``, where a line holds several items).

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
    except JSONShapeError as err:
        raise one_problem(path, f"{path}:{err.line}" if err.line else str(path), str(err)) from None
    image_keys = tuple(dict.fromkeys(([image_column] if image_column else []) + list(JSON_IMAGE_KEYS)))
    caption_keys = tuple(dict.fromkeys(([caption_column] if caption_column else []) + list(JSON_CAPTION_KEYS)))
    cands: List[Candidate] = []
    per_line = Counter(line for _, line in items)
    for n, (obj, line) in enumerate(items):
        # a line holding several items (minified JSON) names each by its place in the list too
        where = f"{path}:{line}" if per_line[line] == 1 else f"{path}:{line} (item {n + 1})"
        if not isinstance(obj, dict):
            cands.append(Candidate(n, where, None, None, [], None,
                                   [f'expected an object like {{"image": ..., "caption": ...}}, got {type(obj).__name__}']))
            continue
        c = Candidate(n, where, None, None, [], None)
        for key, count in getattr(obj, "duplicates", {}).items():
            c.problems.append(f"key '{key}' appears {count} times in this item; keep one")
        ikeys = [k for k in image_keys if k in obj]
        if len(ikeys) > 1:
            c.problems.append(f"keys {' and '.join(repr(k) for k in ikeys)} both name the image; keep one")
        ikey = ikeys[0] if ikeys else None
        raw = obj.get(ikey) if ikey else None
        if ikey is None:
            c.problems.append(f"missing key '{image_keys[0]}'")
        elif not isinstance(raw, str) or not raw.strip():
            c.problems.append(f"empty {ikey}" if not raw else f"'{ikey}' must be a path string")
        else:
            c.raw_image = raw.strip()
            c.image_path = resolve_image(c.raw_image, path.parent)
        ckeys = [k for k in caption_keys if k in obj]
        if len(ckeys) > 1:
            c.problems.append(f"keys {' and '.join(repr(k) for k in ckeys)} both hold captions; keep one "
                              "(or put every caption in 'captions')")
        ckey = ckeys[0] if ckeys else None
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
        return finalize_with(_caption_file_per_image_rows(root, images), root, root, opts)
    cands = _class_folder_rows(root, prompt_templates)
    if not cands:
        raise one_problem(root, str(root), "no captions.txt, no per-image .txt caption files, and no class sub-folders "
                    f"with images ({', '.join(IMAGE_EXTENSIONS)})")
    return finalize_with(cands, root, root, opts)


def _captions_file_rows(captions_file: Path, root: Path) -> List[Candidate]:
    """One candidate per image name; a name on several lines gets their captions (same label, or the line
    is named)."""
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
        if len(parts) > 3 and any(p.strip() for p in parts[3:]):
            extra = ", ".join(repr(p.strip()) for p in parts[3:] if p.strip())
            cands.append(Candidate(line_no, where, None, None, [], None, [
                f"{len(parts)} fields where at most 3 are read (image name, caption, label; extra: {extra}); "
                "a caption cannot hold a tab"]))
            continue
        first = by_name.get(name)
        if first is not None and not empty:
            if label != first.label:
                cands.append(Candidate(line_no, where, None, None, [], None, [
                    f"image '{name}' has label {first.label!r} on line {first.order} and {label!r} here; give an image one label"]))
                continue
            first.captions += caps
            continue
        c = Candidate(line_no, where, name, resolve_image(name, root), caps, label)
        if empty:
            c.problems.append("empty caption")
        else:  # an empty first line does not take the name: the next line with a caption does
            by_name.setdefault(name, c)
        cands.append(c)
    return cands


def _caption_file_per_image_rows(root: Path, images: Sequence[Path]) -> List[Candidate]:
    """One candidate per image, and one (a problem) per caption file with no image beside it."""
    cands: List[Candidate] = []
    stems = {img.with_suffix(".txt") for img in images}
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
    for txt in sorted(p for p in root.iterdir() if p.suffix == ".txt" and p.is_file() and p not in stems and not p.name.startswith(".")):
        looked = ", ".join(txt.stem + ext for ext in IMAGE_EXTENSIONS)
        cands.append(Candidate(len(cands), str(txt), None, None, [], None, [f"caption file with no image beside it (none of {looked})"]))
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
