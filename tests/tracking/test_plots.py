"""The figures a run logs, looked at: the training-curve grid (its shape, the monitored metric, the best step
marked), the similarity heatmap (class prompts when the split has classes, distinct captions otherwise: exact
cells), and the saved PNGs (size, not blank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipexp.tracking import plots


def _history(best_step=40):
    """A run's history as the trainer keeps it: train/* every 10 steps, val/* every 20, best/<monitor> on improving."""
    steps = range(10, 81, 10)
    val_steps = (0, 20, 40, 60, 80)
    balanced = dict(zip(val_steps, (0.33, 0.50, 0.70, 0.65, 0.60)))
    h = {"train/loss": [(s, 4.2 - s / 100) for s in steps], "train/lr": [(s, 1e-3) for s in steps],
         "train/temperature": [(s, 0.07) for s in steps], "val/loss": [(s, 4.1 - s / 200) for s in val_steps],
         "val/i2t_R1": [(s, 0.5) for s in val_steps], "val/t2i_R1": [(s, 0.4) for s in val_steps],
         "val/zeroshot_acc": [(s, 0.6) for s in val_steps],
         "val/zeroshot_balanced_acc": list(balanced.items()),
         "best/val/zeroshot_balanced_acc": [(s, balanced[s]) for s in (0, 20, best_step)],
         "test/zeroshot_balanced_acc": [(best_step, 0.68)]}
    return h


def _lines(ax, prefix):
    return [line for line in ax.get_lines() if str(line.get_label()).startswith(prefix)]


def test_training_curves_are_a_grid_led_by_the_monitored_metric_with_the_best_step_marked(tmp_path):
    history = _history(best_step=40)
    fig = plots.training_curves_figure(history)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    # monitored, loss, retrieval, zero-shot (the balanced one is the monitored panel's), lr, temperature: 6 panels, 2 rows of 3
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 3)
    assert [ax.get_title() for ax in shown] == ["val/zeroshot_balanced_acc (monitored)", "loss", "retrieval R@1 (val)",
                                                "zero-shot accuracy (val)", "learning rate", "temperature"]
    for ax in shown:  # every panel has the dashed line at the best step, found from best/<monitor>'s last point
        (line,) = _lines(ax, plots.BEST_MARKER)
        assert list(line.get_xdata()) == [40, 40]
    monitored = shown[0]
    (best,) = _lines(monitored, "best 0.7")
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([40], [0.70])
    (test,) = _lines(monitored, "test ")
    assert (list(test.get_xdata()), list(test.get_ydata())) == ([40], [0.68])
    assert [str(line.get_label()) for line in shown[1].get_lines()][:2] == ["train/loss", "val/loss"]

    path = plots.training_curves(history, tmp_path / "curves.png")
    with Image.open(path) as img:
        assert img.size == (1260, 680)  # 3 columns x 4.2 in, 2 rows x 3.4 in, 100 dpi: reads in MLflow's preview
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 10  # drawn, not blank


def test_training_curves_without_a_monitor_still_plot_and_mark_nothing():
    history = {k: v for k, v in _history().items() if not k.startswith(("best/", "test/"))}
    fig = plots.training_curves_figure(history)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert shown[0].get_title() == "loss" and all(not _lines(ax, plots.BEST_MARKER) for ax in shown)
    explicit = plots.training_curves_figure(history, monitor="val/zeroshot_balanced_acc", best_step=60)
    assert [list(line.get_xdata()) for line in _lines(explicit.axes[0], plots.BEST_MARKER)] == [[60, 60]]


def test_similarity_heatmap_with_classes_is_each_class_against_each_class_prompt(tmp_path):
    # class 0: images (1, 0) and (0.6, 0.8); class 1: (0, 1); one unlabelled image; prompts: the axes
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    e = {"image": image, "text": image.clone(), "labels": torch.tensor([0, 0, 1, -1]), "class_text": torch.eye(2)}
    fig = plots.similarity_heatmap_figure(e, ["a", "a", "b", "c"], ["nominal", "defect"], split="test")
    ax = fig.axes[0]
    cells = np.asarray(ax.get_images()[0].get_array())
    assert cells == pytest.approx(np.array([[0.8, 0.4], [0.0, 1.0]]), abs=1e-6)  # means of (1, 0.6), (0, 0.8); (0), (1)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["nominal (n=2)", "defect (n=1)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["'nominal' prompts", "'defect' prompts"]
    assert sorted(t.get_text() for t in ax.texts) == ["0.00", "0.40", "0.80", "1.00"]
    path = plots.similarity_heatmap(e, ["a", "a", "b", "c"], ["nominal", "defect"], tmp_path / "sim.png")
    with Image.open(path) as img:
        assert img.size[0] >= 500 and img.size[1] >= 350 and np.asarray(img.convert("L"), dtype=float).std() > 10


def test_similarity_heatmap_without_classes_uses_one_pair_per_distinct_caption():
    # captions repeat: pairs 0, 2, 3 carry the distinct ones; their images against their captions, matches on the diagonal
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]])
    captions = ["a cat", "a cat", "a dog", "a bird", "a dog"]
    e = {"image": image, "text": text, "labels": torch.full((5,), -1)}
    assert plots.distinct_caption_pairs(captions) == [0, 2, 3]
    ax = plots.similarity_heatmap_figure(e, captions, []).axes[0]
    expected = image[[0, 2, 3]] @ text[[0, 2, 3]].T
    assert np.asarray(ax.get_images()[0].get_array()) == pytest.approx(expected.numpy(), abs=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a cat", "a dog", "a bird"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["image 1", "image 2", "image 3"]
