"""evaluate_heads on real embeddings: a tiny random-weight CLIP's embeddings of the textile images, every head,
the k-shot protocol, the saved heads predicting the run's test figures again, an exemplar bank, the figures."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from clipexp.evaluate import class_text_embeddings, zero_shot_metrics
from clipexp.heads import DEFAULT_HEADS, build_head, evaluate_heads, fit_heads, kshot_indices, load_heads, split_exemplars
from clipexp.heads.calibration import expected_calibration_error
from clipexp.heads.conformal import coverage
from clipexp.heads.metrics import balanced_accuracy
from clipexp.tracking.heads_plots import heads_figures

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["nominal", "local defect", "global defect"]
PER_CLASS = {"nominal": (24, 12, 12), "local": (12, 6, 6), "global": (12, 6, 6)}  # train / val / test images
SHOTS, DRAWS = [1, 4], 2


@pytest.fixture(scope="module")
def run():
    """Embeddings of 120 real textile images by a tiny CLIP at 64 px, split per class; class prompt embeddings."""
    from clipexp.config.notes import CLIPFinetuningConfig
    from clipexp.data.textile import textile_root
    from clipexp.models.loading import CLIPFinetuningController

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ctl = CLIPFinetuningController(CLIPFinetuningConfig(model_name="tiny", image_resolution=64, max_sequence_length=32, device="cpu")).setup()
    splits = {s: ([], []) for s in ("train", "val", "test")}
    for folder, counts in PER_CLASS.items():
        files = sorted((textile_root() / folder).glob("*.jpg"))[: sum(counts)]
        emb = ctl.encode_image([Image.open(f) for f in files]).float()
        label = CLASSES.index({"local": "local defect", "global": "global defect"}.get(folder, folder))
        start = 0
        for split, n in zip(splits, counts):
            splits[split][0].append(emb[start:start + n])
            splits[split][1].append(torch.full((n,), label))
            start += n
    data = {s: (torch.cat(e), torch.cat(y)) for s, (e, y) in splits.items()}
    text = class_text_embeddings(ctl.encode_text, CLASSES, ["a photo of {}.", "an image of {} fabric."]).float()
    scale = float(ctl.model.logit_scale.detach().exp())
    report = evaluate_heads(data["train"], data["val"], data["test"], CLASSES, text, scale, heads=DEFAULT_HEADS,
                            shots=SHOTS, draws=DRAWS, alpha=0.2, score="aps", seed=0)
    return data, text, scale, report


def test_every_head_has_every_metric(run):
    data, _, _, report = run
    m = report.metrics
    assert report.heads.names == list(DEFAULT_HEADS) and report.split == "test"
    for head in DEFAULT_HEADS:
        names = ["acc", "balanced_acc", "ece", "nll", "brier", "ece_uncalibrated", "nll_uncalibrated", "brier_uncalibrated",
                 "coverage", "set_size"] + [f"recall/{k}" for k in ("nominal", "local_defect", "global_defect")] \
            + [f"coverage/{k}" for k in ("nominal", "local_defect", "global_defect")]
        for name in names:
            assert math.isfinite(m[f"test/{head}/{name}"]), (head, name)
        for name in ("acc", "balanced_acc", "temperature", "nll_uncalibrated"):
            assert math.isfinite(m[f"val/{head}/{name}"]), (head, name)
        assert 0 <= m[f"test/{head}/acc"] <= 1 and 1 <= m[f"test/{head}/set_size"] <= 3  # APS sets are never empty
        if head != "zero_shot":
            for k in SHOTS:
                assert len(report.kshot[head][k]) == DRAWS
                assert m[f"test/{head}/shots_{k}/balanced_acc_mean"] == pytest.approx(sum(report.kshot[head][k]) / DRAWS)
                assert m[f"test/{head}/shots_{k}/balanced_acc_std"] >= 0
    assert "zero_shot" not in report.kshot  # no training examples: no k-shot curve
    assert {"val/knn/chosen_k", "val/linear/chosen_C", "val/tip/chosen_alpha", "val/tip/chosen_beta"} <= set(m)


def test_the_zero_shot_head_agrees_with_the_trainers_zero_shot_metrics(run):
    data, text, _, report = run
    zs = zero_shot_metrics(data["test"][0], data["test"][1], text)
    assert report.metrics["test/zero_shot/acc"] == zs["zeroshot_acc"]
    assert report.metrics["test/zero_shot/balanced_acc"] == pytest.approx(zs["zeroshot_balanced_acc"], abs=1e-6)


def test_kshot_figures_are_heads_fitted_on_each_seeded_draw(run):
    """The prototype's k-shot accuracies, recomputed draw by draw from the seeded indices."""
    data, _, scale, report = run
    (x, y), (tx, ty) = data["train"], data["test"]
    for k in SHOTS:
        expected = []
        for draw in range(DRAWS):
            idx = kshot_indices(y, k, seed=0, draw=draw)
            head = build_head("prototype", 3, scale=scale).fit(x[idx], y[idx])
            expected.append(balanced_accuracy(head.scores(tx).argmax(dim=1), ty, 3))
        assert report.kshot["prototype"][k] == expected


def test_sets_are_calibrated_on_the_probabilities_they_are_predicted_from(run):
    """LAC in-sample: on the calibration split itself exactly ceil((n + 1)(1 - alpha)) of the n samples are
    covered (continuous scores), which holds only if the thresholds came from the probabilities predict serves."""
    data, text, scale, _ = run
    heads = fit_heads(data["train"], data["val"], CLASSES, heads=["prototype", "linear", "tip"], class_text_embeds=text,
                      logit_scale=scale, alpha=0.2, score="lac")
    vx, vy = data["val"]
    for head in heads.names:
        assert heads.temperatures[head] != pytest.approx(1.0, abs=1e-3)  # the temperature matters here
        cov, _, _ = coverage(heads.predict(vx, head).sets, vy)
        assert cov * len(vy) == pytest.approx(math.ceil((len(vy) + 1) * 0.8)), head


def test_saved_heads_predict_the_reports_test_figures(run, tmp_path):
    data, _, _, report = run
    path = report.save_heads(tmp_path / "model" / "heads.pt")
    assert (tmp_path / "model" / "heads.pt.sha256").is_file()
    loaded = load_heads(path)
    x, y = data["test"]
    for head in DEFAULT_HEADS:
        pred = loaded.predict(x, head)
        assert pred.alpha == 0.2 and pred.sets is not None
        assert expected_calibration_error(pred.probabilities.double(), y) == pytest.approx(report.metrics[f"test/{head}/ece"], abs=1e-6)
        cov, _, size = coverage(pred.sets, y)
        assert (cov, size) == (report.metrics[f"test/{head}/coverage"], report.metrics[f"test/{head}/set_size"])
        assert (pred.prediction == y).double().mean() == pytest.approx(report.metrics[f"test/{head}/acc"])
    rows = loaded.predict(x[:4], "linear", alpha=0.5).records()
    assert [set(r) for r in rows] == [{"prediction", "probability", "set"}] * 4
    assert all(r["prediction"] in CLASSES and 0 < r["probability"] <= 1 and r["set"] and r["set"][0] == r["prediction"] for r in rows)


def test_a_damaged_heads_file_is_refused(run, tmp_path):
    from clipexp.heads import HeadError

    path = run[3].save_heads(tmp_path / "heads.pt")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(HeadError, match="heads.pt: .*changed or damaged"):
        load_heads(path)


def test_an_exemplar_bank_of_classes_the_run_never_saw(run):
    """A prototype head built at predict time from exemplars of two classes, half of each held out to calibrate."""
    data, _, scale, _ = run
    x, y = data["train"]
    keep = y > 0  # exemplars of 'local defect' and 'global defect' only, relabelled 0 and 1
    ex, ey = x[keep], y[keep] - 1
    fit_idx, cal_idx = split_exemplars(ey, 0.5, seed=0)
    assert len(fit_idx) == len(cal_idx) == 12 and not set(fit_idx.tolist()) & set(cal_idx.tolist())
    bank = fit_heads((ex[fit_idx], ey[fit_idx]), (ex[cal_idx], ey[cal_idx]), ["scratch", "stain"], heads=["prototype"],
                     logit_scale=scale, alpha=0.1)
    pred = bank.predict(data["test"][0])
    assert pred.probabilities.shape == (len(data["test"][1]), 2) and pred.sets.shape == pred.probabilities.shape
    assert {r["prediction"] for r in pred.records()} <= {"scratch", "stain"}


def test_the_figures_are_written(run, tmp_path):
    paths = heads_figures(run[3], tmp_path / "plots")
    assert [p.name for p in paths] == ["heads_kshot.png", "heads_reliability.png", "heads_coverage.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300
