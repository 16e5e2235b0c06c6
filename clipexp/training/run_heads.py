"""The heads of :mod:`clipexp.heads` in a run: fitted at the end (and, with ``eval.at_each_eval``, at every
evaluation) on the training split's image embeddings, calibrated on val, measured on val and test.

The training split is embedded with the evaluation transforms (no augmentation, each pair's first caption:
:meth:`~clipexp.data.DataSplits.train_for_evaluation`), the image tower alone; val and test come from the
evaluations the trainer runs anyway (at the end, val once more, image tower only, when the last evaluation was
the test split's). The zero-shot and Tip-Adapter heads take the class prompt embeddings of the run's templates and
the temperature the run ends with (the one the served model's zero-shot probabilities use).

A run without labels, without a validation split or with a streamed training split (``data=webdataset``) says so
in one line when it starts and fits no heads; ``eval.heads=[]`` turns them off silently (no work at all).
Several processes: every rank embeds its share, rank 0 fits and measures the heads.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from clipexp.evaluate import class_text_embeddings
from clipexp.heads import HeadError, HeadsReport, evaluate_heads

log = logging.getLogger(__name__)


class RunHeads:
    """The heads of one run: ``eval`` (the config group), ``data`` (the run's :class:`~clipexp.data.DataSplits`),
    ``evaluator`` (its :class:`~clipexp.evaluate.Evaluator`: the model, the prompts, the ranks), ``seed`` (k-shot draws)."""

    def __init__(self, eval_cfg: Any, data: Any, evaluator: Any, seed: int):
        self.evaluator, self.seed = evaluator, int(seed)
        self.names = list(eval_cfg.heads)
        c = eval_cfg.conformal
        self.options: Dict[str, Any] = dict(heads=self.names, shots=list(eval_cfg.shots), draws=int(eval_cfg.draws),
                                            calibrate=bool(eval_cfg.calibrate), alpha=float(c.alpha), score=str(c.score),
                                            mondrian=bool(c.mondrian))
        self.class_names = list(data.class_names)
        self.val = data.val
        self.train = None
        reason = self._skip_reason(data)
        if reason:
            log.info("heads: none fitted: %s", reason)
        elif self.names:
            self.train = data.train_for_evaluation()
        self.at_each_eval = self.enabled and bool(eval_cfg.at_each_eval)

    def _skip_reason(self, data: Any) -> Optional[str]:
        if not self.names:
            return None
        if not self.class_names:
            return "the data has no labels (the heads are classifiers: give a label column)"
        if data.val is None:
            return "there is no validation split (data.val_split=0): the heads choose, calibrate and set thresholds on it"
        if getattr(data.train, "is_stream", False):
            return "the training split is streamed (data=webdataset): the heads need all its embeddings at once"
        return None

    @property
    def enabled(self) -> bool:
        return self.train is not None

    def _logit_scale(self) -> float:
        from clipexp.serving.inference import zero_shot_temperature

        return 1.0 / zero_shot_temperature(self.evaluator.loss_fn, self.evaluator.model)

    def _embed(self, dataset: Any) -> Optional[Dict[str, Any]]:
        """The image embeddings of ``dataset`` (rank 0; None on the others). The global RNG is left as it was (a loader
        draws its base seed from it), so heads at each evaluation do not change the training that follows."""
        with torch.random.fork_rng(devices=[]):
            return self.evaluator.embed(dataset, images_only=True)

    def _fit(self, val: Optional[Dict[str, Any]], test: Optional[Dict[str, Any]], shots: bool) -> Optional[HeadsReport]:
        """Every rank embeds the training split (its share); rank 0 fits and measures. ``val``/``test``: the
        evaluator's embeddings of those splits (None on the other ranks)."""
        train = self._embed(self.train)
        if train is None or val is None:  # not rank 0
            return None
        e = self.evaluator
        text = class_text_embeddings(e.encode_prompts, self.class_names, e.templates)
        split = lambda emb: None if emb is None else (emb["image"], emb["labels"])  # noqa: E731
        options = dict(self.options, shots=self.options["shots"] if shots else [])
        try:
            return evaluate_heads(split(train), split(val), split(test), self.class_names, text, self._logit_scale(),
                                  seed=self.seed, **options)
        except HeadError as err:  # e.g. a class with no training image: the run's outputs matter more
            log.warning("heads: none fitted: %s", err)
            return None

    def at_end(self, result: Optional[Dict[str, Any]], split: Optional[str]) -> Optional[HeadsReport]:
        """The heads of the weights the run tests: ``result`` is the trainer's last evaluation (of ``split``,
        test or val) with them, whose embeddings are reused; the k-shot protocol runs here only."""
        if not self.enabled or result is None:
            return None
        val = result["embeddings"] if split == "val" else self._embed(self.val)
        return self._fit(val, result["embeddings"] if split == "test" else None, shots=True)

    def val_metrics(self, val: Optional[Dict[str, Any]]) -> Dict[str, float]:
        """``val/<head>/...`` of the weights the model holds now (``eval.at_each_eval``), from the val embeddings
        the evaluation just computed; empty on the ranks other than 0."""
        report = self._fit(val, None, shots=False) if self.at_each_eval else None
        return report.metrics if report is not None else {}
