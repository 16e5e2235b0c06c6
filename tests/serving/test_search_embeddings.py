"""``predict search`` reads only embeddings of its own model: ``embed`` stores the model's fingerprint in the
file (parquet metadata, a CSV column, a ``.fingerprint`` file beside a ``.npy``), and ``search`` refuses a file of
another model, of no model, or of another kind (zero_shot's predictions CSV) in one line.

Two tiny CLIPs with random weights (seeds 0 and 1) are saved as ``save_pretrained`` folders, as a run's
``model/`` is; the images are real PNG files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipexp.errors import UserError
from clipexp.serving.embeddings import EmbeddingsError, read_embeddings
from clipexp.serving.predict import main

RES = 32


def _save_model(folder: Path, seed: int, arch) -> Path:
    from clipexp.models.clip import build_model, build_processor
    from clipexp.serving.inference import InferenceSpec

    torch.manual_seed(seed)
    model = build_model(dict(arch), RES, 77)
    model.save_pretrained(folder)
    build_processor(RES, 77).save_pretrained(folder)
    InferenceSpec(class_names=["red", "blue"], image_resolution=RES, batch_size=4).save(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from clipexp.config.compose import compose

    tmp = tmp_path_factory.mktemp("search")
    arch = compose(["model=tiny"]).model.architecture
    images = tmp / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    for i in range(6):
        Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"img_{i}.png")
    return {"tmp": tmp, "a": _save_model(tmp / "model_a", 0, arch), "b": _save_model(tmp / "model_b", 1, arch), "images": images}


def _search(model: Path, embeddings: Path, out: Path, query: str = "a red fabric") -> int:
    return main(["search", "--model", str(model), "--embeddings", str(embeddings), "--query", query, "--top-k", "3",
                 "--out", str(out), "--device", "cpu"])


def _embed(model: Path, images: Path, out: Path) -> int:
    return main(["embed", "--model", str(model), "--images", str(images), "--out", str(out), "--no-progress", "--device", "cpu"])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_embeddings_in_every_format_carry_the_fingerprint_and_search_the_same(setup, tmp_path, capsys):
    import pandas as pd

    from clipexp.serving.inference import CLIPInference

    inf = CLIPInference.from_pretrained(setup["a"], device="cpu")
    direct = inf.embed_sources(sorted(str(p) for p in setup["images"].iterdir()))[0]
    hits = {}
    for suffix in (".parquet", ".csv", ".npy"):
        emb = tmp_path / f"emb{suffix}"
        assert _embed(setup["a"], setup["images"], emb) == 0
        found = read_embeddings(emb)
        paths, vectors, fingerprint = found.paths, found.vectors, found.fingerprint
        assert fingerprint == inf.fingerprint and len(fingerprint) == 64
        assert paths == sorted(str(p) for p in setup["images"].iterdir())
        assert torch.equal(vectors, direct)  # the same float32 values, whatever the file
        assert _search(setup["a"], emb, tmp_path / f"hits{suffix}.csv") == 0
        hits[suffix] = pd.read_csv(tmp_path / f"hits{suffix}.csv")
    want = (direct @ inf.encode_texts(["a red fabric"])[0]).topk(3).indices.tolist()
    for suffix, frame in hits.items():
        assert frame["path"].tolist() == [paths[i] for i in want], suffix


def test_embeddings_of_another_model_are_refused_in_one_line(setup, tmp_path, capsys):
    emb = tmp_path / "emb_b.parquet"
    assert _embed(setup["b"], setup["images"], emb) == 0
    fp_b = read_embeddings(emb).fingerprint
    capsys.readouterr()
    assert _search(setup["a"], emb, tmp_path / "hits.csv") == 2
    from clipexp.serving.inference import CLIPInference

    fp_a = CLIPInference.from_pretrained(setup["a"], device="cpu").fingerprint
    assert fp_a != fp_b
    assert _error(capsys) == (
        f"clipexp: error: --embeddings {emb} was written by another model (fingerprint {fp_b[:12]}) than "
        f"--model {setup['a']} ({fp_a[:12]}): its scores would rank wrongly; embed the images again with this model "
        f"(embed --model {setup['a']} --out {emb})")
    assert not (tmp_path / "hits.csv").exists()


def test_the_same_weights_from_another_folder_are_the_same_model(setup, tmp_path):
    """The fingerprint is of the weights and the image pipeline, not of where the folder lies."""
    copy = tmp_path / "copied_model"
    shutil.copytree(setup["a"], copy)
    emb = tmp_path / "emb.csv"
    assert _embed(setup["a"], setup["images"], emb) == 0
    assert _search(copy, emb, tmp_path / "hits.csv") == 0


def test_one_changed_weight_or_another_image_size_is_another_model(setup):
    from clipexp.serving.inference import CLIPInference, InferenceSpec, model_fingerprint

    inf = CLIPInference.from_pretrained(setup["a"], device="cpu")
    base = model_fingerprint(inf.model, inf.spec)
    assert base == inf.fingerprint
    with torch.no_grad():
        weight = inf.model.visual_projection.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one float32 value, one ulp
    assert model_fingerprint(inf.model, inf.spec) != base
    fresh = CLIPInference.from_pretrained(setup["a"], device="cpu")
    spec = InferenceSpec(**{**fresh.spec.__dict__, "image_resolution": RES * 2})
    assert model_fingerprint(fresh.model, spec) != base
    assert model_fingerprint(fresh.model, fresh.spec) == base


def test_a_predictions_csv_or_a_file_without_fingerprint_is_one_line(setup, tmp_path, capsys):
    import pandas as pd

    preds = tmp_path / "preds.csv"
    assert main(["zero_shot", "--model", str(setup["a"]), "--images", str(setup["images"]), "--out", str(preds),
                 "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert _search(setup["a"], preds, tmp_path / "hits.csv") == 2
    columns = ", ".join(pd.read_csv(preds).columns)
    assert _error(capsys) == (
        f"clipexp: error: --embeddings {preds}: no embedding columns e0, e1, ... (columns: {columns}): "
        f"not a file embed wrote; write one with embed --model {setup['a']} --images <images> --out {tmp_path / 'embeddings.csv'}")
    # a parquet of the old layout (no fingerprint in its metadata)
    old = tmp_path / "old.parquet"
    pd.DataFrame({"path": ["x.png"], "embedding": [[0.5, 0.5]], "error": [None]}).to_parquet(old, index=False)
    assert _search(setup["a"], old, tmp_path / "hits.csv") == 2
    assert _error(capsys) == (
        f"clipexp: error: --embeddings {old} carries no model fingerprint (written by an older clipexp or "
        f"another tool), so nothing says which model wrote it; embed the images again with this model "
        f"(embed --model {setup['a']} --out {old})")
    # not a parquet file at all
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("image_path,caption\n")
    assert _search(setup["a"], bogus, tmp_path / "hits.csv") == 2
    line = _error(capsys)
    assert line.startswith(f"clipexp: error: --embeddings {bogus}: not a parquet file (") and \
        line.endswith("); give the .parquet, .csv or .npy file embed wrote")
    with pytest.raises(EmbeddingsError) as exc:
        read_embeddings(tmp_path / "emb.txt")
    assert isinstance(exc.value, UserError)
