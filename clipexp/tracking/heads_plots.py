"""Figures of the heads' evaluation (:class:`clipexp.heads.HeadsReport`): accuracy against shots, reliability
diagrams before and after temperature scaling, and the conformal coverage per class.

``heads_figures(report, folder)`` writes all three and returns their paths (the run logs them as artifacts).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clipexp.heads import HeadsReport  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def kshot_curve(report: HeadsReport, path: Path) -> Path:
    """Test balanced accuracy against shots per class (log axis), one line per head with a +-1 std band over
    the draws; heads fitted on the whole training split as dashed horizontal lines (zero-shot among them)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(report.heads.names):
        color = colors[i % len(colors)]
        curve = report.kshot.get(name)
        if curve:
            ks = sorted(curve)
            mean = np.array([np.mean(curve[k]) for k in ks])
            std = np.array([np.std(curve[k], ddof=1) if len(curve[k]) > 1 else 0.0 for k in ks])
            ax.plot(ks, mean, marker="o", color=color, label=name)
            ax.fill_between(ks, mean - std, mean + std, color=color, alpha=0.2)
        full = report.metrics.get(f"test/{name}/balanced_acc")
        if full is not None:
            ax.axhline(full, color=color, linestyle="--", linewidth=1, label=f"{name} (all training data)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test balanced accuracy")
    ax.set_title("k-shot heads (mean +- std over draws)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def reliability_diagram(report: HeadsReport, path: Path) -> Path:
    """Per head, accuracy against confidence in the 15 ECE bins, before and after temperature scaling (the
    diagonal is perfect calibration; a marker's area is its bin's count), with the ECE of each in the legend."""
    names = [n for n in report.heads.names if n in report.reliability]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for kind, marker in (("uncalibrated", "s"), ("calibrated", "o")):
            bins = report.reliability[name][kind]
            full = bins["count"] > 0
            ece = report.metrics.get(f"{report.split}/{name}/ece" + ("_uncalibrated" if kind == "uncalibrated" else ""))
            label = kind + (f" (ECE {ece:.3f})" if ece is not None else "")
            line, = ax.plot(bins["confidence"][full], bins["accuracy"][full], linewidth=1, label=label)
            area = 300.0 * bins["count"][full] / max(1.0, float(bins["count"].sum()))
            ax.scatter(bins["confidence"][full], bins["accuracy"][full], s=area + 4, marker=marker, color=line.get_color())
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name} (T = {report.heads.temperatures[name]:.2f})", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def coverage_table(report: HeadsReport, path: Path) -> Path:
    """A table: per head, the coverage of each class, the overall coverage and the mean set size at alpha."""
    names = [n for n in report.heads.names if n in report.coverage]
    columns = list(report.class_names) + ["all", "set size"]
    cells = [[f"{v:.3f}" if v == v else "-" for v in report.coverage[n]["per_class"]]
             + [f"{report.coverage[n]['coverage']:.3f}", f"{report.coverage[n]['set_size']:.2f}"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 0.5 + 0.22 * (1 + max(1, len(names)))))
    ax.axis("off")
    if cells:
        table = ax.table(cellText=cells, rowLabels=names, colLabels=columns, loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    how = {(c.score, c.mondrian) for n in names if (c := report.heads.conformal.get(n)) is not None}
    what = ", ".join(f"{score}{', per class' if mondrian else ''}" for score, mondrian in sorted(how))
    ax.set_title(f"{report.split} coverage of the prediction sets ({what}; target {1 - report.alpha:.2f})", fontsize=9)
    return _save(fig, path)


def heads_figures(report: HeadsReport, folder: Path) -> List[Path]:
    """The three figures in ``folder``: ``heads_kshot.png`` (when the k-shot protocol ran),
    ``heads_reliability.png``, ``heads_coverage.png`` (when the heads have prediction sets)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    if report.kshot:
        out.append(kshot_curve(report, folder / "heads_kshot.png"))
    if report.reliability:
        out.append(reliability_diagram(report, folder / "heads_reliability.png"))
    if report.coverage:
        out.append(coverage_table(report, folder / "heads_coverage.png"))
    return out
