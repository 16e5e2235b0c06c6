"""Image embeddings on disk, with the fingerprint of the model that wrote them (``predict embed`` / ``search``).

A gallery embedded by one model and searched with another ranks silently wrongly, so each file carries the
model's fingerprint (:func:`clipexp.serving.inference.model_fingerprint`: the weights and the image pipeline):

* ``.parquet``: columns ``path``, ``embedding`` (a list of floats; null where the image failed), ``error``;
  the fingerprint in the file's metadata (``clipexp.model_fingerprint``);
* ``.csv``: columns ``path``, ``error``, ``model_fingerprint`` (every row), ``e0`` .. ``e<D-1>`` (empty where
  the image failed), float32 values written with 9 significant digits, so they read back bit for bit;
* ``.npy``: the ``[N, D]`` array (NaN rows for failures), the paths in ``<name>.paths.txt`` and the fingerprint
  in ``<name>.fingerprint`` beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from clipexp.errors import UserError

EMBEDDING_SUFFIXES = (".parquet", ".csv", ".npy")
METADATA_KEY = b"clipexp.model_fingerprint"
FINGERPRINT_COLUMN = "model_fingerprint"
_DIM = re.compile(r"e(\d+)")


class EmbeddingsError(UserError, ValueError):
    """An ``--embeddings`` file that cannot be used: one line (the file, why, the command that writes a good one)."""


@dataclass
class Embeddings:
    """A gallery read back: ``vectors`` is ``[N, D]`` float32 with NaN rows for failed images; ``fingerprint``
    is None for a file written before fingerprints (or by another tool)."""

    paths: List[str]
    vectors: torch.Tensor
    fingerprint: Optional[str]


def write_embeddings(out: Path, paths: Sequence[str], embeds: torch.Tensor, errors: Sequence[Optional[str]],
                     fingerprint: str) -> Path:
    """Write ``embeds`` (``[N, D]``, NaN rows where ``errors`` names a failure) as ``out``'s suffix says."""
    import numpy as np

    if out.suffix == ".npy":
        np.save(out, embeds.numpy())
        out.with_suffix(".paths.txt").write_text("\n".join(paths) + "\n")
        out.with_suffix(".fingerprint").write_text(fingerprint + "\n")
        return out
    import pandas as pd

    if out.suffix == ".csv":
        frame = pd.DataFrame(embeds.numpy().astype(np.float32), columns=[f"e{d}" for d in range(embeds.shape[1])])
        frame.insert(0, FINGERPRINT_COLUMN, fingerprint)
        frame.insert(0, "error", list(errors))
        frame.insert(0, "path", list(paths))
        frame.to_csv(out, index=False, float_format="%.9g")
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = [None if err else row.tolist() for row, err in zip(embeds, errors)]
    table = pa.Table.from_pandas(pd.DataFrame({"path": list(paths), "embedding": vectors, "error": list(errors)}), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: fingerprint.encode()}), out)
    return out


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_embeddings(path: Path, model: str = "<model>") -> Embeddings:
    """``embed``'s output (any of :data:`EMBEDDING_SUFFIXES`) -> :class:`Embeddings`; anything else is one
    :class:`EmbeddingsError` line (``model``: the ``--model`` its advice names)."""
    import numpy as np

    if not path.is_file():
        raise EmbeddingsError(f"--embeddings {path}: no such file; write it with embed --model {model} --images <images> --out {path}")
    if path.suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingsError(f"--embeddings {path}: give the .parquet, .csv or .npy file embed wrote")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise EmbeddingsError(f"--embeddings {path}: not a .npy array ({_first_line(err)}); give the .parquet, .csv or .npy "
                               "file embed wrote") from None
        names, side = path.with_suffix(".paths.txt"), path.with_suffix(".fingerprint")
        paths = names.read_text().splitlines() if names.is_file() else [str(i) for i in range(len(array))]
        fingerprint = side.read_text().strip() if side.is_file() else None
        return Embeddings(paths, torch.from_numpy(np.asarray(array, dtype=np.float32)), fingerprint or None)
    if path.suffix == ".csv":
        return _read_csv(path, model)
    return _read_parquet(path, model)


def _read_csv(path: Path, model: str) -> Embeddings:
    import numpy as np
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise EmbeddingsError(f"--embeddings {path}: not a CSV file ({_first_line(err)}); give the .parquet, .csv or .npy "
                           "file embed wrote") from None
    dims = sorted((int(m.group(1)), c) for c in frame.columns if (m := _DIM.fullmatch(str(c))))
    if not dims or "path" not in frame.columns or [d for d, _ in dims] != list(range(len(dims))):
        raise EmbeddingsError(f"--embeddings {path}: no embedding columns e0, e1, ... (columns: {', '.join(map(str, frame.columns))}): "
                           f"not a file embed wrote; write one with embed --model {model} --images <images> "
                           f"--out {path.with_name('embeddings.csv')}")
    vectors = frame[[c for _, c in dims]].to_numpy(dtype=np.float64).astype(np.float32)
    prints = frame[FINGERPRINT_COLUMN].dropna().astype(str).unique().tolist() if FINGERPRINT_COLUMN in frame.columns else []
    if len(prints) > 1:
        raise EmbeddingsError(f"--embeddings {path}: rows of {len(prints)} different models (column {FINGERPRINT_COLUMN}); "
                           f"embed the images again with one model (embed --model {model} --out {path})")
    return Embeddings([str(p) for p in frame["path"]], torch.from_numpy(vectors), prints[0] if prints else None)


def _read_parquet(path: Path, model: str) -> Embeddings:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise EmbeddingsError(f"--embeddings {path}: not a parquet file ({_first_line(err)}); give the .parquet, .csv or .npy "
                           "file embed wrote") from None
    if "embedding" not in table.column_names or "path" not in table.column_names:
        raise EmbeddingsError(f"--embeddings {path}: no 'path' and 'embedding' columns (columns: {', '.join(table.column_names)}): "
                           f"not a file embed wrote; write one with embed --model {model} --images <images> --out {path}")
    fingerprint = (table.schema.metadata or {}).get(METADATA_KEY)
    cells = table.column("embedding").to_pylist()
    dim = next((len(v) for v in cells if v is not None), 0)
    rows = [np.asarray(v, dtype=np.float32) if v is not None else np.full(dim, np.nan, np.float32) for v in cells]
    vectors = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, dim)
    return Embeddings([str(p) for p in table.column("path").to_pylist()], vectors, fingerprint.decode() if fingerprint else None)


def load_embeddings(path: Path):
    """``embed``'s output -> ``(paths, [N, D] float tensor with NaN rows for failed images)`` (see :func:`read_embeddings`)."""
    found = read_embeddings(path)
    return found.paths, found.vectors
