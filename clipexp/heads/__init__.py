"""Heads, calibration and conformal prediction sets on a CLIP's image embeddings (plain library code: torch,
numpy, scikit-learn, scipy; no Hydra, no MLflow). See docs/heads.md.

* :mod:`~clipexp.heads.heads`: zero-shot, prototype, kNN, linear probe, Tip-Adapter cache;
* :mod:`~clipexp.heads.calibration`: temperature scaling, ECE, NLL, Brier;
* :mod:`~clipexp.heads.conformal`: split conformal sets (LAC, APS; global or per class);
* :mod:`~clipexp.heads.shots`: the k-shot protocol's seeded draws;
* :mod:`~clipexp.heads.fitted`: the fitted heads as one saveable object that predicts;
* :mod:`~clipexp.heads.evaluation`: :func:`evaluate_heads`, the end-of-run entry point.
"""

from clipexp.heads.calibration import expected_calibration_error, fit_temperature
from clipexp.heads.conformal import SplitConformal
from clipexp.heads.evaluation import DEFAULT_HEADS, HeadsReport, check_options, evaluate_heads
from clipexp.heads.fitted import HEADS_FILE, HeadSet, Prediction, fit_heads, load_heads, save_heads
from clipexp.heads.heads import Head, HeadError, build_head, head_from_state
from clipexp.heads.shots import kshot_indices, split_exemplars

__all__ = [
    "DEFAULT_HEADS", "HEADS_FILE", "Head", "HeadError", "HeadSet", "HeadsReport", "Prediction", "SplitConformal", "build_head",
    "check_options", "evaluate_heads", "expected_calibration_error", "fit_heads", "fit_temperature", "head_from_state",
    "kshot_indices", "load_heads", "save_heads", "split_exemplars",
]
