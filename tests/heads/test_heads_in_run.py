"""The heads in a run: one tracked run (the smoke preset on real textile images, every head, the k-shot protocol
and heads at every evaluation) trained once for the module with the trainer itself; its MLflow store, run folder
and the trainer's own embeddings are what each test reads. Runs that fit no heads are checked without training."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clipexp.heads.calibration import expected_calibration_error
from clipexp.heads.conformal import coverage
from clipexp.names import HEADS

SHOTS = [1, 2]
HEADS_ON = [f"eval.heads=[{','.join(HEADS)}]", f"eval.shots=[{','.join(map(str, SHOTS))}]", "eval.draws=2"]


def _train(tmp: Path, *overrides: str) -> dict:
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import Trainer

    tmp.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = compose_and_validate(["experiment=smoke", f"tracking.uri={uri}", *overrides])
    trainer = Trainer(cfg, tmp / "run")
    try:
        trainer.setup()
        results = trainer.train()
        # the trainer's own encoder outputs with the weights it tested and saved
        embed = lambda ds: trainer.evaluator.embed(ds, images_only=True)  # noqa: E731
        train, test = embed(trainer.data.train_for_evaluation()), embed(trainer.data.test)
    finally:
        trainer.cleanup("FINISHED")
    return {"uri": uri, "run_id": trainer.tracker.run_id, "out": tmp / "run", "results": results, "train": train, "test": test,
            "class_names": list(trainer.data.class_names), "data": trainer.data}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("heads_run"), *HEADS_ON, "eval.at_each_eval=true")


def _client(run):
    from mlflow.tracking import MlflowClient

    return MlflowClient(run["uri"])


def test_every_heads_metric_is_logged_at_the_step_of_the_test_metrics(run):
    client, heads = _client(run), run["results"]["heads"]
    logged = client.get_run(run["run_id"]).data.metrics
    (test_step,) = {m.step for m in client.get_metric_history(run["run_id"], "test/zeroshot_acc")}
    for head in HEADS:
        for name in ("acc", "balanced_acc", "ece", "nll", "brier", "ece_uncalibrated", "coverage", "set_size", "recall/nominal"):
            assert math.isfinite(heads[f"test/{head}/{name}"]), (head, name)
        assert math.isfinite(heads[f"val/{head}/temperature"]) and heads[f"val/{head}/temperature"] > 0
        if head != "zero_shot":
            for k in SHOTS:
                assert f"test/{head}/shots_{k}/balanced_acc_mean" in heads
    for key, value in heads.items():  # metrics.json's values are MLflow's, logged with the test metrics, at their step
        at_test = [h.value for h in client.get_metric_history(run["run_id"], key) if h.step == test_step]
        assert at_test and at_test[-1] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        if key.startswith("test/"):
            assert logged[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # the pre-existing tables are still there, unchanged in shape
    assert {"baseline", "final", "best", "test"} <= set(run["results"])


def test_the_zero_shot_head_is_the_runs_zero_shot_rule(run):
    r = run["results"]
    assert r["heads"]["test/zero_shot/acc"] == r["test"]["test/zeroshot_acc"]
    # (the trainer averages the recalls in float32)
    assert r["heads"]["test/zero_shot/balanced_acc"] == pytest.approx(r["test"]["test/zeroshot_balanced_acc"], abs=4 * torch.finfo(torch.float32).eps)


def test_heads_are_fitted_on_the_training_split_seen_through_the_evaluation_transforms(run):
    from clipexp.heads import load_heads

    heads = load_heads(run["out"] / "model" / "heads.pt")
    knn = heads.heads["knn"]
    train = run["train"]
    assert torch.equal(knn.bank_labels, train["labels"])
    reference = torch.nn.functional.normalize(train["image"], dim=-1)
    assert float((knn.bank - reference).abs().max()) <= 64 * torch.finfo(torch.float32).eps
    ds = run["data"].train_for_evaluation()
    assert not ds.is_random and ds.image_paths == run["data"].train.image_paths
    first = ds.caption_tokens()["input_ids"]
    ds.set_epoch(3)
    assert torch.equal(ds[5]["pixel_values"], run["data"].val.image_transform(ds.load_image(5)))  # no augmentation, any epoch
    assert torch.equal(ds[5]["input_ids"], first[5])  # the pair's own first caption, no drawn prompt


def test_saved_heads_reproduce_the_logged_test_figures(run):
    from clipexp.heads import load_heads

    heads, logged = load_heads(run["out"] / "model" / "heads.pt"), run["results"]["heads"]
    x, y = run["test"]["image"], run["test"]["labels"]
    assert heads.class_names == run["class_names"]
    for head in HEADS:
        pred = heads.predict(x, head)
        cov, _, size = coverage(pred.sets, y)
        assert cov == pytest.approx(logged[f"test/{head}/coverage"], abs=1e-12)
        assert size == pytest.approx(logged[f"test/{head}/set_size"], abs=1e-12)
        assert expected_calibration_error(pred.probabilities.double(), y) == pytest.approx(logged[f"test/{head}/ece"], abs=1e-6)


def test_figures_and_the_heads_file_are_written_beside_the_other_outputs_and_logged(run):
    out, client = run["out"], _client(run)
    figures = ["heads_kshot.png", "heads_reliability.png", "heads_coverage.png"]
    for name in figures:
        assert (out / "plots" / name).stat().st_size > 1000, name
    assert {f"plots/{name}" for name in figures} <= {a.path for a in client.list_artifacts(run["run_id"], "plots")}
    model = out / "model"
    digest = hashlib.sha256((model / "heads.pt").read_bytes()).hexdigest()
    sums = dict(line.split()[::-1] for line in (model / "SHA256SUMS").read_text().splitlines())
    assert sums["heads.pt"] == digest and "heads.pt.sha256" in sums
    assert digest in (model / "heads.pt.sha256").read_text()
    assert "model/heads.pt" in {a.path for a in client.list_artifacts(run["run_id"], "model")}


def test_at_each_eval_logs_the_heads_at_every_evaluation(run):
    client = _client(run)
    steps = lambda key: [m.step for m in client.get_metric_history(run["run_id"], key)]  # noqa: E731
    evals = steps("val/zeroshot_acc")
    assert evals == [0, 2, 4]
    (tested,) = steps("test/zeroshot_acc")  # the best checkpoint's step: the weights the end of the run measures
    for head in HEADS:
        assert steps(f"val/{head}/balanced_acc") == evals + [tested]  # every evaluation, then at the end with the test
    assert "val/linear/balanced_acc" in run["results"]["baseline"] and "test/linear/acc" not in run["results"]["baseline"]


# ------------------------------------------------------------------------------- runs without heads
def _data(**changes):
    data = SimpleNamespace(class_names=["a", "b"], val=object(), train=SimpleNamespace(is_stream=False),
                           train_for_evaluation=lambda: "train split, evaluation transforms")
    data.__dict__.update(changes)
    return data


@pytest.mark.parametrize("changes,reason", [
    ({"class_names": []}, "the data has no labels"),
    ({"val": None}, "there is no validation split (data.val_split=0)"),
    ({"train": SimpleNamespace(is_stream=True)}, "the training split is streamed (data=webdataset)"),
])
def test_a_run_that_cannot_fit_heads_says_why_in_one_line_and_fits_none(compose_cfg, caplog, changes, reason):
    from clipexp.training.run_heads import RunHeads

    with caplog.at_level(logging.INFO, logger="clipexp.training.run_heads"):
        heads = RunHeads(compose_cfg("eval.at_each_eval=true").eval, _data(**changes), evaluator=None, seed=0)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"heads: none fitted: {reason}") and "\n" not in line
    assert not heads.enabled and not heads.at_each_eval
    assert heads.at_end({"embeddings": None}, "test") is None and heads.val_metrics(None) == {}  # (the evaluator is never asked)


def test_no_heads_is_silent_and_costs_nothing(compose_cfg, caplog):
    from clipexp.training.run_heads import RunHeads

    def untouched():
        raise AssertionError("eval.heads=[] must not build the training split's evaluation dataset")

    with caplog.at_level(logging.INFO, logger="clipexp.training.run_heads"):
        heads = RunHeads(compose_cfg("eval.heads=[]").eval, _data(train_for_evaluation=untouched), evaluator=None, seed=0)
    assert not caplog.records and not heads.enabled
    assert heads.at_end({"embeddings": None}, "test") is None


@pytest.mark.slow  # two more training runs (40-80 s on the busy 2-core box)
def test_heads_change_none_of_the_runs_other_metrics(tmp_path):
    """The same run with heads at every evaluation and without heads: every metric the run logs without them is the same,
    to the bit, and nothing of the heads is written without them. LoRA with dropout makes training draw from the global
    RNG, which the heads' embedding (a loader draws its seed from it) must leave as it was."""
    dropout = ["model.lora.r=4", "model.lora.dropout=0.2"]
    heads = _train(tmp_path / "heads", *dropout, *HEADS_ON, "eval.at_each_eval=true")
    plain = _train(tmp_path / "plain", *dropout, "eval.heads=[]")
    for table in ("baseline", "final", "best", "test"):
        assert plain["results"][table] == {k: v for k, v in heads["results"][table].items() if k in plain["results"][table]}, table
        assert not any(k.startswith(tuple(f"val/{h}/" for h in HEADS)) for k in plain["results"][table])
    assert "heads" not in plain["results"] and "val/linear/balanced_acc" in heads["results"]["final"]
    assert not (plain["out"] / "model" / "heads.pt").exists() and not list((plain["out"] / "plots").glob("heads_*"))


def test_the_printed_heads_table_shows_the_logged_test_figures(run):
    from clipexp.tracking.outputs import heads_table

    heads = run["results"]["heads"]
    lines = heads_table(heads, 0.1).splitlines()
    assert lines[0].split() == ["head", "(test)", "balanced_acc", "acc", "ece_raw", "ece", "coverage", "set_size"]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[1:-1]}
    assert list(rows) == list(HEADS)
    for head, values in rows.items():
        keys = ("balanced_acc", "acc", "ece_uncalibrated", "ece", "coverage", "set_size")
        assert values == [round(heads[f"test/{head}/{k}"], 4) for k in keys], head
    assert lines[-1].endswith("at alpha 0.1") and heads_table({}, 0.1) is None  # no test figures: no table
