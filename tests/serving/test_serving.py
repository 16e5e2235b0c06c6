"""Using the fine-tuned model: the logged pyfunc model, the batch tools, the MLflow server, bad input.

One short tracked run (the smoke preset on real textile images, every head on, the pyfunc model on, registered) is
trained once for the module with the trainer itself, so the trainer's own test-split embeddings and
logged metrics are the reference every answer is compared with.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from processes import stop_group
import torch

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
REGISTERED = "textile-clip"
HEADS = ("zero_shot", "prototype", "knn", "linear", "tip")


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Unit vectors from the same weights, batched differently: float32 eps x the reduction length."""
    assert a.shape == b.shape
    tol = 64 * torch.finfo(torch.float32).eps * max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol, float((a - b).abs().max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.evaluate import class_text_embeddings
    from clipexp.training.trainer import Trainer

    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # nearest-neighbour resizing (not the default bicubic): every answer below also shows the run's
    # interpolation travels with the model to the pyfunc model, the batch tools and the server
    cfg = compose_and_validate(["experiment=smoke", f"tracking.uri={uri}", "tracking.pyfunc_model=true",
                                f"tracking.register_model={REGISTERED}", "model.image_interpolation=nearest",
                                f"eval.heads=[{','.join(HEADS)}]"])
    trainer = Trainer(cfg, tmp / "run")
    try:
        trainer.setup()
        results = trainer.train()
        test = trainer.data.test
        e = trainer.evaluator.embed(test)  # the trainer's own encoder outputs, with the weights it saved
        class_embeds = class_text_embeddings(trainer.evaluator.encode_prompts, list(trainer.data.class_names), list(cfg.domain.prompt_templates))
        preds = (e["image"] @ class_embeds.T).argmax(dim=1)
    finally:
        trainer.cleanup("FINISHED")
    csv_path = tmp / "run" / "test_split.csv"  # written by the run, beside model/
    return {
        "tmp": tmp, "uri": uri, "run_id": trainer.tracker.run_id, "out": tmp / "run", "results": results, "csv": csv_path,
        "paths": test.image_paths, "labels": [p.label for p in test.pairs], "captions": test.captions,
        "image": e["image"], "text": e["text"], "class_names": list(trainer.data.class_names),
        "predicted": [trainer.data.class_names[int(i)] for i in preds],
    }


@pytest.fixture(scope="module")
def pyfunc(run):
    import mlflow

    mlflow.set_tracking_uri(run["uri"])
    return mlflow.pyfunc.load_model(f"runs:/{run['run_id']}/clip")


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLIPEXP_RUN_STAMP")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow models serve runs uvicorn from the venv
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------ the model
def test_logged_model_is_linked_to_run_metrics_and_registered(run):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run["uri"])
    r = client.get_run(run["run_id"])
    models = client.search_logged_models(experiment_ids=[r.info.experiment_id], filter_string="name = 'clip'")
    assert len(models) == 1
    model = models[0]
    assert model.source_run_id == run["run_id"] and model.tags["monitor"] == "val/t2i_R1"
    assert [o.model_id for o in r.outputs.model_outputs] == [model.model_id]
    linked = {m.key: m.value for m in model.metrics}  # the metrics of the run's last step, test metrics included
    assert linked["test/zeroshot_acc"] == r.data.metrics["test/zeroshot_acc"]
    assert linked["test/i2t_R1"] == r.data.metrics["test/i2t_R1"]

    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "text"]
    assert [p["name"] for p in info.signature.params.to_dict()] == ["task", "head", "alpha"]
    assert info.saved_input_example_info is not None
    # typed outputs, and the model page's description: how to load it, its columns (tests/tracking/test_mlflow_browser.py shows it)
    outputs = {c["name"]: c["type"] for c in info.signature.outputs.to_dict()}
    assert (outputs["predicted_class"], outputs["probabilities"], outputs["image_embedding"]) == ("string", "map", "array")
    note = model.tags["mlflow.note.content"]
    assert f'mlflow.pyfunc.load_model("runs:/{run["run_id"]}/clip")' in note and "| `probabilities` | `map<double>` |" in note
    assert model.tags["mlflow.source.name"] == "clipexp train"

    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == run["run_id"] and version.tags["monitor"] == "val/t2i_R1"
    assert float(version.tags["val/t2i_R1"]) == pytest.approx(run["results"]["best"]["val/t2i_R1"], rel=1e-6)
    spec = json.loads((run["out"] / "model" / "clipexp_inference.json").read_text())
    assert spec["class_names"] == run["class_names"] and spec["image_resolution"] == 64


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and MLflow: 20-80 s on the busy 2-core box
def test_fresh_process_round_trip_equals_trainer_encoder(run):
    """A new interpreter in an empty folder (no clipexp config, no PYTHONPATH): MLflow loads the model
    with the clipexp code logged inside it; its embeddings are the trainer's."""
    script = (
        "import json, sys, mlflow, pandas as pd, numpy as np\n"
        f"m = mlflow.pyfunc.load_model('runs:/{run['run_id']}/clip')\n"
        "import clipexp\n"
        "images, texts = json.loads(sys.stdin.read())\n"
        "df = pd.DataFrame({'image': images, 'text': texts})\n"
        "out = m.predict(df, params={'task': 'embed'})\n"
        "np.save('img.npy', np.array(out['image_embedding'].tolist(), dtype=np.float32))\n"
        "np.save('txt.npy', np.array(out['text_embedding'].tolist(), dtype=np.float32))\n"
        "print(clipexp.__file__)\n"
    )
    cwd = run["tmp"] / "fresh"
    cwd.mkdir()
    res = subprocess.run([sys.executable, "-c", script], cwd=cwd, input=json.dumps([[_b64(p) for p in run["paths"]], run["captions"]]),
                         env=_env(MLFLOW_TRACKING_URI=run["uri"]), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "/code/clipexp/" in res.stdout  # imported from the model's own code copy
    import numpy as np

    _close(torch.from_numpy(np.load(cwd / "img.npy")), run["image"])
    _close(torch.from_numpy(np.load(cwd / "txt.npy")), run["text"])


def test_pyfunc_zero_shot_and_similarity_match_the_trainer(run, pyfunc):
    import pandas as pd

    df = pd.DataFrame({"image": [_b64(p) for p in run["paths"]], "text": None})
    out = pyfunc.predict(df, params={"task": "zero_shot"})
    assert out["predicted_class"].tolist() == run["predicted"] and out["error"].isna().all()
    probs = out["probabilities"][0]
    assert list(probs) == run["class_names"] and sum(probs.values()) == pytest.approx(1.0, rel=1e-6)

    texts = run["captions"][:3]
    sim = pyfunc.predict(pd.DataFrame({"image": [_b64(p) for p in run["paths"][:2]] + [None], "text": [None, *texts[:2]]}),
                         params={"task": "similarity"})
    scores = torch.tensor(sim["scores"][:2].tolist())
    expected = run["image"][:2] @ torch.stack([run["text"][0], run["text"][1]]).T  # the texts given: captions 0 and 1
    _close(scores, expected)
    assert sim["scores"][2] is None


def test_the_runs_interpolation_travels_with_the_saved_model(run, tmp_path):
    """The run resized with nearest: the saved spec says so, the saved image processor resamples with
    PIL's NEAREST (code 0), and plain transformers' CLIPImageProcessor then gives the pixels the trainer
    evaluated; a copy without clipexp's spec file still loads as nearest, from that processor."""
    import shutil

    from PIL import Image
    from transformers import CLIPProcessor

    from clipexp.serving.inference import SPEC_FILE, CLIPInference

    model_dir = run["out"] / "model"
    assert json.loads((model_dir / SPEC_FILE).read_text())["image_interpolation"] == "nearest"
    processor = CLIPProcessor.from_pretrained(model_dir)
    assert int(processor.image_processor.resample) == 0
    inference = CLIPInference.from_pretrained(model_dir, device="cpu")
    ours = inference.normalize(torch.stack([inference.load_image(p) for p in run["paths"][:4]]))
    hf = processor.image_processor([Image.open(p).convert("RGB") for p in run["paths"][:4]], return_tensors="pt")["pixel_values"]
    assert hf.shape == ours.shape
    # the same uint8 pixels, normalised in float32 by two formulas: a few eps of the values' magnitude
    assert float((hf - ours).abs().max()) <= 8 * torch.finfo(torch.float32).eps * float(hf.abs().max())
    bare = tmp_path / "model"
    shutil.copytree(model_dir, bare)
    (bare / SPEC_FILE).unlink()
    (bare / "SHA256SUMS").unlink()  # a hand-made folder: no manifest (an edited folder with one would be refused)
    assert CLIPInference.from_pretrained(bare, device="cpu").spec.image_interpolation == "nearest"


# -------------------------------------------------------------------------------- batch tools
def test_cli_zero_shot_on_test_split_reproduces_logged_accuracy(run, tmp_path, capsys):
    """The CLI's entry point, the model named by its run id: predictions and accuracy are the run's own."""
    from clipexp.serving.predict import main

    out = tmp_path / "preds.csv"
    assert main(["zero_shot", "--model", run["run_id"], "--tracking-uri", run["uri"], "--images", str(run["csv"]),
                 "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    import pandas as pd

    rows = pd.read_csv(out)
    assert rows["path"].tolist() == run["paths"] and rows["predicted_class"].tolist() == run["predicted"]
    test = run["results"]["test"]
    acc = float((rows["predicted_class"] == rows["label"]).mean())
    assert acc == test["test/zeroshot_acc"]
    assert f"zeroshot_acc={test['test/zeroshot_acc']:.4f} zeroshot_balanced_acc={test['test/zeroshot_balanced_acc']:.4f}" in stdout
    confusion = pd.read_csv(out.with_suffix(".confusion.csv"), index_col=0)
    assert int(confusion.values.trace()) == round(acc * len(rows))


def test_cli_sources_embed_and_search(run, tmp_path, capsys):
    """Run folder, save_pretrained folder and models:/ URI give the same model; embed -> search finds
    the trainer's nearest images."""
    from clipexp.serving.predict import main

    preds = {}
    for name, source in (("folder", str(run["out"])), ("pretrained", str(run["out"] / "model")), ("registry", f"models:/{REGISTERED}/1")):
        out = tmp_path / f"{name}.csv"
        assert main(["zero_shot", "--model", source, "--tracking-uri", run["uri"], "--images", str(run["csv"]), "--out", str(out),
                     "--no-progress", "--batch-size", "4"]) == 0
        preds[name] = out.read_text()
    assert preds["folder"] == preds["pretrained"]
    assert [ln.split(",")[2] for ln in preds["registry"].splitlines()] == [ln.split(",")[2] for ln in preds["folder"].splitlines()]

    for suffix in (".parquet", ".npy"):
        emb = tmp_path / f"emb{suffix}"
        assert main(["embed", "--model", str(run["out"]), "--images", str(run["csv"]), "--out", str(emb), "--no-progress"]) == 0
        from clipexp.serving.embeddings import load_embeddings

        paths, vectors = load_embeddings(emb)
        assert paths == run["paths"]
        _close(vectors, run["image"])
    capsys.readouterr()
    query = run["captions"][0]
    assert main(["search", "--model", str(run["out"]), "--embeddings", str(tmp_path / "emb.parquet"), "--query", query, "--top-k", "3",
                 "--out", str(tmp_path / "hits.csv")]) == 0
    import pandas as pd

    hits = pd.read_csv(tmp_path / "hits.csv")
    expected = (run["image"] @ run["text"][0]).topk(3).indices.tolist()
    assert hits["path"].tolist() == [run["paths"][i] for i in expected] and hits["rank"].tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------- classify: the heads
def _set_figures(sets, labels):
    """(coverage, mean set size) of prediction sets given as ``a|b`` strings (empty: NaN from the CSV) or lists."""
    as_list = [s if isinstance(s, list) else (s.split("|") if isinstance(s, str) and s else []) for s in sets]
    return (sum(lab in s for s, lab in zip(as_list, labels)) / len(labels), sum(map(len, as_list)) / len(labels))


def test_cli_classify_on_the_test_split_gives_the_runs_head_figures(run, tmp_path, capsys):
    """Per head, `predict classify` on the run's test_split.csv: accuracy, ECE of the written probabilities, coverage
    and mean size of the written sets are the run's logged test/<head>/... figures."""
    import pandas as pd

    from clipexp.heads.calibration import expected_calibration_error
    from clipexp.serving.predict import main

    logged = run["results"]["heads"]
    for head in HEADS:
        out = tmp_path / f"{head}.csv"
        assert main(["classify", "--model", str(run["out"]), "--images", str(run["csv"]), "--head", head, "--out", str(out),
                     "--no-progress"]) == 0
        rows = pd.read_csv(out)
        assert rows.columns.tolist() == ["path", "label", "prediction", "probability", "set", "error"] + [f"p({c})" for c in run["class_names"]]
        assert rows["path"].tolist() == run["paths"] and rows["error"].isna().all()
        probs = torch.tensor(rows[[f"p({c})" for c in run["class_names"]]].values)
        labels = torch.tensor([run["class_names"].index(c) for c in rows["label"]])
        assert rows["probability"].tolist() == probs.max(dim=1).values.tolist()
        assert float((rows["prediction"] == rows["label"]).mean()) == logged[f"test/{head}/acc"]
        assert expected_calibration_error(probs, labels) == pytest.approx(logged[f"test/{head}/ece"], abs=1e-6)
        cov, size = _set_figures(rows["set"].tolist(), rows["label"].tolist())
        assert (cov, size) == (pytest.approx(logged[f"test/{head}/coverage"], abs=1e-12), pytest.approx(logged[f"test/{head}/set_size"], abs=1e-12))
        assert f"coverage={logged[f'test/{head}/coverage']:.4f} set_size={logged[f'test/{head}/set_size']:.4f}" in capsys.readouterr().out


def test_pyfunc_classify_answers_with_the_runs_calibrated_probabilities_and_sets(run, pyfunc):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from clipexp.heads import load_heads

    df = pd.DataFrame({"image": [_b64(p) for p in run["paths"]]})
    logged = run["results"]["heads"]
    for head in HEADS:
        out = pyfunc.predict(df, params={"task": "classify", "head": head})
        assert out["error"].isna().all() and set(out["prediction"]) <= set(run["class_names"])
        cov, size = _set_figures(out["set"].tolist(), run["labels"])
        assert (cov, size) == (pytest.approx(logged[f"test/{head}/coverage"], abs=1e-12), pytest.approx(logged[f"test/{head}/set_size"], abs=1e-12))
        assert all(p[row] == max(p.values()) for p, row in zip(out["probabilities"], out["prediction"]))
    # another alpha: the run's saved heads on the trainer's own test embeddings give the same sets and probabilities
    heads = load_heads(run["out"] / "model" / "heads.pt")
    expected = heads.predict(run["image"], "linear", alpha=0.3)
    out = pyfunc.predict(df, params={"task": "classify", "head": "linear", "alpha": 0.3})
    assert out["set"].tolist() == expected.set_names()
    assert out["probability"].tolist() == pytest.approx(expected.probability.tolist(), abs=1e-5)
    default = pyfunc.predict(df.head(2), params={"task": "classify"})  # the run's first head, at its alpha
    assert default["set"].tolist() == heads.predict(run["image"][:2], heads.names[0]).set_names()
    with pytest.raises(MlflowException, match=r"^no head 'svm' in this run's heads: use one of zero_shot, prototype, knn, linear, tip$"):
        pyfunc.predict(df, params={"task": "classify", "head": "svm"})
    with pytest.raises(MlflowException, match=r"^alpha=1.5: give a miscoverage rate in \(0, 1\)"):
        pyfunc.predict(df, params={"task": "classify", "alpha": 1.5})


def test_cli_classify_with_exemplars_of_classes_the_run_never_saw(run, tmp_path, capsys):
    """--exemplars bank/: a sub-folder per new class ("speckled", "clean": textile images from outside the run's 96,
    under names the run never had); half of each class's images (seed 0) fit the head, the rest calibrate its
    temperature and sets: the written probabilities and sets are fit_heads' on the same embeddings."""
    import shutil

    import pandas as pd

    from clipexp.data.textile import textile_root
    from clipexp.heads import fit_heads, split_exemplars
    from clipexp.serving.inference import CLIPInference
    from clipexp.serving.predict import main, read_images

    bank, queries = tmp_path / "bank", tmp_path / "queries"
    for folder, name in (("local", "speckled"), ("nominal", "clean")):
        files = [f for f in sorted((textile_root() / folder).glob("*.jpg")) if str(f) not in run["paths"]][-11:]
        for target, chunk in ((bank, files[:8]), (queries, files[8:])):
            (target / name).mkdir(parents=True)
            for f in chunk:
                shutil.copy(f, target / name / f.name)
    out = tmp_path / "preds.csv"
    assert main(["classify", "--model", str(run["out"]), "--images", str(queries), "--exemplars", str(bank), "--head", "prototype",
                 "--alpha", "0.2", "--out", str(out), "--no-progress"]) == 0
    assert "classified by head prototype (sets at alpha 0.2" in capsys.readouterr().out
    rows = pd.read_csv(out)
    names = ["clean", "speckled"]
    assert [c for c in rows.columns if c.startswith("p(")] == [f"p({c})" for c in names]

    inference = CLIPInference.from_pretrained(run["out"] / "model", device="cpu")
    paths, labels = read_images(str(bank), "image_path", "label")
    emb, _ = inference.embed_sources(paths)
    y = torch.tensor([names.index(c) for c in labels])
    fit, cal = split_exemplars(y, 0.5, seed=0)
    assert len(fit) == len(cal) == 8
    expected_set = fit_heads((emb[fit], y[fit]), (emb[cal], y[cal]), names, heads=["prototype"],
                             logit_scale=1.0 / inference.spec.temperature, alpha=0.2)
    expected = expected_set.predict(inference.embed_sources(rows["path"].tolist())[0], "prototype")
    assert 0.05 < float(expected.probability.min()) and float(expected.probability.max()) < 0.95  # informative, not saturated
    assert float(torch.tensor(rows[[f"p({c})" for c in names]].values).float().sub(expected.probabilities).abs().max()) <= 1e-6
    assert rows["set"].fillna("").str.split("|").tolist() == [s or [""] for s in expected.set_names()]
    # tip also needs the new classes' prompt embeddings: built from the run's templates
    assert main(["classify", "--model", str(run["out"]), "--images", str(queries), "--exemplars", str(bank), "--head", "tip",
                 "--out", str(out), "--no-progress"]) == 0
    assert set(pd.read_csv(out)["prediction"]) <= set(names)


def test_classify_without_heads_or_with_bad_arguments_is_one_line(run, tmp_path, capsys):
    import shutil

    from clipexp.files import write_folder_manifest
    from clipexp.serving.predict import main

    bare = tmp_path / "model"
    shutil.copytree(run["out"] / "model", bare)
    for name in ("heads.pt", "heads.pt.sha256"):
        (bare / name).unlink()
    write_folder_manifest(bare)  # a model saved without heads (eval.heads=[])
    args = ["classify", "--images", str(run["csv"]), "--out", str(tmp_path / "p.csv"), "--no-progress"]
    assert main([*args, "--model", str(bare)]) == 2
    assert capsys.readouterr().err.strip().startswith("clipexp: error: this model has no fitted heads (heads.pt")
    assert main([*args, "--model", str(run["out"]), "--classes", "a,b"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: --classes: classify takes its classes from the run's heads, or from "
                                                    "--exemplars' sub-folders")
    with pytest.raises(SystemExit):
        main([*args, "--model", str(run["out"]), "--alpha", "1"])
    assert "argument --alpha: '1': give a miscoverage rate in (0, 1)" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    shutil.copy(run["paths"][0], tmp_path / "flat" / "a.jpg")
    assert main([*args, "--model", str(run["out"]), "--exemplars", str(tmp_path / "flat")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--exemplars {tmp_path / 'flat'}: 1 image(s) directly in the folder; put each "
                                                    "class's images in a sub-folder named after the class (e.g. scratch/001.png)")


# ------------------------------------------------------------------------------------ bad input
def test_unreadable_image_is_reported_on_its_row(run, pyfunc, tmp_path):
    import pandas as pd

    from clipexp.serving.predict import main

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(Path(run["paths"][0]).read_bytes()[:300])  # a truncated JPEG
    df = pd.DataFrame({"image": [_b64(run["paths"][0]), _b64(bad), "not base64!", _b64(run["paths"][1])]})
    out = pyfunc.predict(df, params={"task": "zero_shot"})
    assert out["predicted_class"][[0, 3]].tolist() == run["predicted"][:2]
    assert out["error"][1].startswith(f"image '<base64 image, {len(_b64(bad))} chars>' is truncated or corrupt")
    assert out["predicted_class"][1] is None
    assert out["error"][2].startswith("image 'not base64!' is not base64-encoded image data") and out["predicted_class"][2] is None

    listing = tmp_path / "images.csv"
    listing.write_text(f"image_path\n{run['paths'][0]}\nbroken.jpg\n")
    assert main(["zero_shot", "--model", str(run["out"]), "--images", str(listing), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    rows = pd.read_csv(tmp_path / "p.csv")
    assert rows["predicted_class"][0] == run["predicted"][0] and str(bad) in rows["error"][1]


def test_unknown_task_and_missing_column_are_one_line(run, pyfunc, tmp_path, capsys):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from clipexp.serving.predict import main

    with pytest.raises(MlflowException, match=r"^unknown task 'segment': use one of zero_shot, classify, embed, similarity"):
        pyfunc.predict(pd.DataFrame({"image": [_b64(run["paths"][0])]}), params={"task": "segment"})
    with pytest.raises(MlflowException, match=r"^task similarity needs an 'image' and a 'text' column"):
        pyfunc.predict(pd.DataFrame({"image": [_b64(run["paths"][0])]}), params={"task": "similarity"})
    listing = tmp_path / "images.csv"
    listing.write_text("file\nx.jpg\n")
    assert main(["zero_shot", "--model", str(run["out"]), "--images", str(listing), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"clipexp: error: --images {listing}: no column 'image_path' (columns: file); set --image-column"
    assert main(["zero_shot", "--model", str(tmp_path), "--images", str(listing), "--out", str(tmp_path / "p.csv")]) == 2
    assert "no config.json there or in its model/ folder" in capsys.readouterr().err


def test_saved_model_folder_carries_a_manifest_and_a_changed_byte_is_refused(run, tmp_path, capsys):
    """model/SHA256SUMS lists every file of the saved model (sha256sum format); a flipped byte in the weights or an
    edited spec is one line naming the file, from the batch tool and from the pyfunc loader alike."""
    import hashlib
    import shutil
    import types

    from clipexp.serving.inference import CLIPInference, InferenceError
    from clipexp.serving.predict import main
    from clipexp.serving.pyfunc import CLIPPyfuncModel

    manifest = {line.split("  ")[1]: line.split("  ")[0] for line in (run["out"] / "model" / "SHA256SUMS").read_text().splitlines()}
    assert {"config.json", "clipexp_inference.json"} <= set(manifest) and len(manifest) >= 4
    weights = next(n for n in manifest if n.endswith((".safetensors", ".bin")))
    assert all(hashlib.sha256((run["out"] / "model" / n).read_bytes()).hexdigest() == d for n, d in manifest.items())
    bad = tmp_path / "model"
    shutil.copytree(run["out"] / "model", bad)
    data = bytearray((bad / weights).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / weights).write_bytes(bytes(data))
    expected = f"{bad / weights} does not match its sha256 in {bad / 'SHA256SUMS'}"
    with pytest.raises(InferenceError, match="^" + expected.replace(".", r"\.")):
        CLIPInference.from_pretrained(bad, device="cpu")
    with pytest.raises(InferenceError, match=r"^.*does not match its sha256"):
        CLIPPyfuncModel().load_context(types.SimpleNamespace(artifacts={"clip": str(bad)}))
    assert main(["embed", "--model", str(bad), "--images", str(run["csv"]), "--out", str(tmp_path / "e.npy"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "clipexp export <run folder>" in err[0], err


# ------------------------------------------------------------------- served input: bytes, not paths
def _watch_filesystem(monkeypatch, needles):
    """Every open / stat / exists / realpath / PIL open whose argument mentions one of ``needles``, recorded (and done)."""
    import builtins
    import io

    from PIL import Image

    calls = []

    def watch(owner, name):
        real = getattr(owner, name)

        def watched(*args, **kwargs):
            if any(n in str(a) for a in args for n in needles):
                calls.append(f"{name}({args[0]!r})")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "stat"), (os, "lstat"), (os, "access"),
                        (os, "listdir"), (os.path, "exists"), (os.path, "isfile"), (os.path, "realpath"), (Image, "open")):
        watch(owner, name)
    return calls


def _served(run, tmp_path, monkeypatch, file_root=None, **env):
    """The pyfunc class as MLflow's loader runs it, on a copy of the run's model (spec: ``file_root``), ``env`` set."""
    import shutil
    import types

    from clipexp.serving.pyfunc import CLIPPyfuncModel

    model_dir = tmp_path / "served_model"
    if not model_dir.exists():
        shutil.copytree(run["out"] / "model", model_dir)
    spec = json.loads((model_dir / "clipexp_inference.json").read_text())
    spec["serve_file_root"] = None if file_root is None else str(file_root)
    (model_dir / "clipexp_inference.json").write_text(json.dumps(spec))
    from clipexp.files import write_folder_manifest

    write_folder_manifest(model_dir)  # the operator's edit, re-sealed
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    model = CLIPPyfuncModel()
    model.load_context(types.SimpleNamespace(artifacts={"clip": str(model_dir)}))
    return model


def test_served_model_refuses_paths_without_touching_the_filesystem(run, pyfunc, tmp_path, monkeypatch):
    """A file path, ``../`` and absolute paths sent to the served model are row errors saying it takes image bytes;
    not one of them is opened, stat'ed or checked for existence (the secret is a real image beside the server)."""
    import pandas as pd

    secret = tmp_path / "secret.png"
    secret.write_bytes(Path(run["paths"][0]).read_bytes())
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # where a relative path would be read from
    sent = [str(secret), "../secret.png", "../../../../../../etc/hostname", "/etc/hostname", "~/secret.png", "secret.png",
            f"file://{secret}"]
    calls = _watch_filesystem(monkeypatch, ["secret", "etc/hostname"])
    out = pyfunc.predict(pd.DataFrame({"image": sent + [_b64(run["paths"][1])]}), params={"task": "zero_shot"})
    monkeypatch.undo()
    assert calls == []
    for i, text in enumerate(sent):
        assert out["error"][i] == f"image '{text}' is not base64-encoded image data: a served model takes each image's bytes, " \
            "base64-encoded, never a file path (it reads no file on the server unless its operator logged it with " \
            "tracking.serve_file_root)", out["error"][i]
        assert out["predicted_class"][i] is None
    assert out["error"][len(sent)] is None and out["predicted_class"][len(sent)] == run["predicted"][1]


def test_base64_image_gets_the_answer_predict_gives(run, pyfunc, tmp_path):
    """The same images as base64 to the served model and as files to ``clipexp predict``: the same
    embeddings and classes (also as a data URI and with MIME line breaks)."""
    import textwrap

    import pandas as pd

    from clipexp.serving.embeddings import load_embeddings
    from clipexp.serving.predict import main

    emb, preds = tmp_path / "emb.npy", tmp_path / "preds.csv"
    assert main(["embed", "--model", str(run["out"]), "--images", str(run["csv"]), "--out", str(emb), "--no-progress"]) == 0
    assert main(["zero_shot", "--model", str(run["out"]), "--images", str(run["csv"]), "--out", str(preds), "--no-progress"]) == 0
    _, vectors = load_embeddings(emb)
    images = [_b64(p) for p in run["paths"]]
    images[0] = "data:image/png;base64," + images[0]
    images[1] = "\n".join(textwrap.wrap(images[1], 76))
    out = pyfunc.predict(pd.DataFrame({"image": images}), params={"task": "embed"})
    assert out["error"].isna().all()
    _close(torch.tensor(out["image_embedding"].tolist()), vectors)
    zs = pyfunc.predict(pd.DataFrame({"image": images}), params={"task": "zero_shot"})
    assert zs["predicted_class"].tolist() == pd.read_csv(preds)["predicted_class"].tolist()


def test_serve_file_root_reads_only_under_it(run, tmp_path, monkeypatch):
    """tracking.serve_file_root, named at logging time, goes into the model's spec; the served model then reads
    relative paths under it and refuses absolute paths, ``..`` and symbolic links without touching what is outside."""
    import types

    import pandas as pd

    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.errors import ConfigError
    from clipexp.serving.inference import CLIPInference, InferenceSpec
    from clipexp.serving.logged_model import publish_model

    root, outside = tmp_path / "root", tmp_path / "outside.png"
    (root / "cells").mkdir(parents=True)
    (root / "cells" / "a.png").write_bytes(Path(run["paths"][2]).read_bytes())
    outside.write_bytes(Path(run["paths"][3]).read_bytes())
    (root / "link.png").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"^tracking.serve_file_root=.*is invalid.*an existing folder"):
        compose_and_validate(["experiment=smoke", f"tracking.serve_file_root={tmp_path / 'nowhere'}"])
    model_dir = tmp_path / "served_model"
    import shutil

    shutil.copytree(run["out"] / "model", model_dir)
    cfg = compose_and_validate(["experiment=smoke", f"tracking.serve_file_root={root}"])
    publish_model(types.SimpleNamespace(enabled=False, run_id=None), model_dir, cfg, class_names=run["class_names"], loss_fn=None,
                  model=CLIPInference.from_pretrained(model_dir, device="cpu").model, step=4, best_value=None, eval_batch_size=8)
    assert InferenceSpec.load(model_dir).serve_file_root == str(root.resolve())
    served = _served(run, tmp_path, monkeypatch, file_root=root)
    sent = ["cells/a.png", "./cells/a.png", str(root / "cells" / "a.png"), "../outside.png", "cells/../../outside.png",
            "link.png", "missing.png", "cells"]
    calls = _watch_filesystem(monkeypatch, ["outside"])
    out = served.predict(None, pd.DataFrame({"image": sent}), params={"task": "zero_shot"})
    monkeypatch.undo()
    assert calls == []
    assert out["predicted_class"][:2].tolist() == [run["predicted"][2]] * 2 and out["error"][:2].isna().all()
    reasons = ["is an absolute path", "leaves the model's serve_file_root ('..')", "leaves the model's serve_file_root ('..')",
               "goes through a symbolic link", "not found under the model's serve_file_root", "is not a file under"]
    for text, error, reason in zip(sent[2:], out["error"][2:], reasons):
        assert error.startswith(f"image '{text}' {reason}"), error


def test_request_limits_each_give_their_error(run, tmp_path, monkeypatch):
    """Rows and total size refuse the request (HTTP 400) in one line; bytes and pixels of one image are that row's
    error; each names its limit and variable. A bad variable is one line when the model loads."""
    import io

    import numpy as np
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from PIL import Image

    from clipexp.serving.inference import InferenceError

    def png(image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    noisy = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)))  # ~77 KB
    huge = png(Image.new("RGB", (1200, 1000), (10, 20, 30)))  # 1.2 MP, a few KB
    good = _b64(run["paths"][0])
    served = _served(run, tmp_path, monkeypatch, CLIPEXP_MAX_ROWS=3, CLIPEXP_MAX_REQUEST_BYTES=200_000,
                     CLIPEXP_MAX_IMAGE_BYTES=50_000, CLIPEXP_MAX_IMAGE_PIXELS=1_000_000)
    with pytest.raises(MlflowException, match=r"^the request has 4 rows, over this model's limit of 3 rows per request "
                                              r"\(CLIPEXP_MAX_ROWS\): send them in several requests$"):
        served.predict(None, pd.DataFrame({"image": [good] * 4}))
    with pytest.raises(MlflowException, match=rf"^the request holds {3 * len(noisy):,} bytes of images and texts, over this "
                                              r"model's limit of 200,000 bytes per request \(CLIPEXP_MAX_REQUEST_BYTES\)"):
        served.predict(None, pd.DataFrame({"image": [noisy] * 3}))
    out = served.predict(None, pd.DataFrame({"image": [noisy, huge, good]}), params={"task": "zero_shot"})
    assert out["error"][0] == f"image '<base64 image, {len(noisy)} chars>' is {len(noisy) * 3 // 4:,} bytes, over this model's " \
        "limit of 50,000 bytes per image (CLIPEXP_MAX_IMAGE_BYTES); send a smaller image"
    assert out["error"][1] == f"image '<base64 image, {len(huge)} chars>' is 1200x1000 = 1,200,000 pixels, over this model's " \
        "limit of 1,000,000 pixels per image (CLIPEXP_MAX_IMAGE_PIXELS); send a smaller image"
    assert out["error"][2] is None and out["predicted_class"][2] == run["predicted"][0]
    with pytest.raises(InferenceError, match=r"^CLIPEXP_MAX_ROWS='lots' is not a whole number > 0"):
        _served(run, tmp_path, monkeypatch, CLIPEXP_MAX_ROWS="lots")


# -------------------------------------------------------------------------------------- serving
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload: dict):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow  # the MLflow CLI starts uvicorn, which loads the model: 30-70 s on the busy 2-core box
def test_mlflow_models_serve_answers_like_in_process(run, pyfunc, tmp_path):
    import pandas as pd

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"runs:/{run['run_id']}/clip", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI=run["uri"], CLIPEXP_MAX_ROWS="8"),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the server did not answer /ping within 300 s"
                time.sleep(1)
        images = [_b64(p) for p in run["paths"][:3]] + [base64.b64encode(b"\xff\xd8\xff\xe0 not a jpeg" * 30).decode()]
        texts = run["captions"][:2]
        frame = pd.DataFrame({"image": images + [None, None], "text": [None] * 4 + texts})
        split = json.loads(frame.to_json(orient="split", index=False))
        for task in ("zero_shot", "embed", "similarity"):
            status, body = _post(port, {"dataframe_split": split, "params": {"task": task}})
            assert status == 200, body
            served = body["predictions"]
            local = pyfunc.predict(frame, params={"task": task})
            assert len(served) == 6 and [r["error"] for r in served] == local["error"].tolist()
            assert served[3]["error"].startswith(f"image '<base64 image, {len(images[3])} chars>' is truncated or corrupt")
            if task == "zero_shot":
                assert [r["predicted_class"] for r in served[:3]] == run["predicted"][:3]
                _close(torch.tensor([list(r["probabilities"].values()) for r in served[:3]]),
                       torch.tensor([list(p.values()) for p in local["probabilities"][:3]]))
            elif task == "embed":
                _close(torch.tensor([r["image_embedding"] for r in served[:3]]), run["image"][:3])
                _close(torch.tensor([r["text_embedding"] for r in served[4:]]), run["text"][:2])
            else:
                _close(torch.tensor([r["scores"] for r in served[:3]]), torch.tensor(local["scores"][:3].tolist()))
        status, body = _post(port, {"dataframe_split": split, "params": {"task": "segment"}})
        assert status == 400 and "unknown task 'segment'" in body["message"] and "stack_trace" not in body
        paths = ["../../../../etc/hostname", "/etc/hostname", run["paths"][0]]  # over HTTP too: bytes only, no server file read
        status, body = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[p] for p in paths]}})
        assert status == 200 and all("is not base64-encoded image data" in r["error"] for r in body["predictions"]), body
        status, body = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[images[0]]] * 9}})
        assert status == 400 and "the request has 9 rows, over this model's limit of 8 rows per request (CLIPEXP_MAX_ROWS)" in body["message"]
    finally:
        stop_group(server)
        log.close()
