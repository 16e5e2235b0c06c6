"""Fitted heads with their calibration, as one object a run saves beside its model and ``predict`` / the
served model use: :func:`fit_heads`, :class:`HeadSet` (``predict``, ``save``, ``load``), :class:`Prediction`.

Each head is fitted on the training embeddings; on the validation embeddings it then gets a temperature
(:func:`~clipexp.heads.calibration.fit_temperature`, when ``calibrate``) and conformal calibration scores
of the calibrated probabilities (:class:`~clipexp.heads.conformal.SplitConformal`). Without validation
embeddings (an exemplar bank given at predict time with no held-out part) the temperature is 1 and there
are no prediction sets.

The saved file holds only tensors, numbers, strings, lists and dicts: ``torch.load(path, weights_only=True)``
reads it, and a ``<file>.sha256`` manifest beside it is checked on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from clipexp.heads.calibration import fit_temperature, probabilities
from clipexp.heads.conformal import SplitConformal, check_alpha
from clipexp.heads.heads import Head, HeadError, build_head, class_labels, embeddings, head_from_state, head_names
from clipexp.files import atomic_write, checksum_problem, write_checksum

FORMAT = "clipexp.heads/1"
HEADS_FILE = "heads.pt"  # a run's fitted heads, in its model/ folder (and the MLflow model's)
Split = Tuple[Any, Any]  # (embeddings [N, D], integer labels [N]; a label < 0 = unlabelled, left out)


def labelled(split: Optional[Split], num_classes: int, what: str) -> Optional[Tuple[Tensor, Tensor]]:
    """``(embeddings, labels)`` of the labelled rows of ``split`` (None stays None)."""
    if split is None:
        return None
    x = embeddings(split[0], f"{what} embeddings")
    y = torch.as_tensor(split[1]).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise HeadError(f"{what}: {y.numel()} labels for {x.shape[0]} embeddings; give one class index (or -1) per embedding")
    keep = y >= 0
    return x[keep], class_labels(y[keep], int(keep.sum()), num_classes, f"{what} labels")


@dataclass
class Prediction:
    """``probabilities`` ``[M, C]`` (calibrated), ``prediction`` ``[M]`` (their arg-max) and ``sets`` ``[M, C]``
    (bool; None when the head has no conformal calibration) over ``class_names``."""

    probabilities: Tensor
    prediction: Tensor
    sets: Optional[Tensor]
    class_names: List[str]
    alpha: Optional[float] = None

    @property
    def probability(self) -> Tensor:
        """The predicted class's probability ``[M]``."""
        return self.probabilities.gather(1, self.prediction[:, None])[:, 0]

    def set_names(self) -> Optional[List[List[str]]]:
        """Each row's prediction set as class names, most probable first."""
        if self.sets is None:
            return None
        order = self.probabilities.argsort(dim=1, descending=True, stable=True)
        return [[self.class_names[c] for c in row.tolist() if keep[c]] for row, keep in zip(order, self.sets)]

    def records(self) -> List[Dict[str, Any]]:
        """One dict per row with the columns ``prediction`` (class name), ``probability`` and ``set`` (list of
        class names, or None): what ``clipexp predict classify`` writes and the served model answers."""
        names = self.set_names()
        return [{"prediction": self.class_names[int(c)], "probability": float(p), "set": None if names is None else names[i]}
                for i, (c, p) in enumerate(zip(self.prediction, self.probability))]


class HeadSet:
    """Fitted heads (by name) over ``class_names``, each with its ``temperature`` and optional conformal
    calibration; ``alpha`` is the default miscoverage of the prediction sets."""

    def __init__(self, class_names: Sequence[str], heads: Dict[str, Head], temperatures: Dict[str, float],
                 conformal: Dict[str, Optional[SplitConformal]], alpha: float = 0.1):
        self.class_names = [str(c) for c in class_names]
        self.heads, self.temperatures, self.conformal = dict(heads), dict(temperatures), dict(conformal)
        self.alpha = check_alpha(alpha)

    @property
    def names(self) -> List[str]:
        return list(self.heads)

    def _head(self, head: Optional[str]) -> str:
        name = head or self.names[0]
        if name not in self.heads:
            raise HeadError(f"no head {name!r} in this run's heads: use one of {', '.join(self.names)}")
        return name

    def logits(self, emb: Any, head: Optional[str] = None) -> Tensor:
        """The head's raw scores ``[M, C]`` (before the temperature)."""
        return self.heads[self._head(head)].scores(emb)

    def predict(self, emb: Any, head: Optional[str] = None, alpha: Optional[float] = None) -> Prediction:
        """Calibrated probabilities, arg-max and prediction sets at ``alpha`` (default: the set's) for the
        embeddings ``[M, D]`` under ``head`` (default: the first head)."""
        name = self._head(head)
        probs = probabilities(self.logits(emb, name), self.temperatures.get(name, 1.0))
        alpha = self.alpha if alpha is None else check_alpha(alpha)
        conformal = self.conformal.get(name)
        sets = conformal.sets(probs, alpha) if conformal is not None else None
        return Prediction(probs, probs.argmax(dim=1), sets, self.class_names, alpha if sets is not None else None)

    # ------------------------------------------------------------------------------------ saving
    def state_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT, "class_names": self.class_names, "alpha": self.alpha,
            "heads": {name: {"head": head.state_dict(), "temperature": float(self.temperatures.get(name, 1.0)),
                             "conformal": None if self.conformal.get(name) is None else self.conformal[name].state_dict()}
                      for name, head in self.heads.items()},
        }

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "HeadSet":
        if state.get("format") != FORMAT:
            raise HeadError(f"saved heads of format {state.get('format')!r}: this clipexp reads {FORMAT!r}")
        heads = {n: head_from_state(s["head"]) for n, s in state["heads"].items()}
        conformal = {n: None if s["conformal"] is None else SplitConformal.from_state_dict(s["conformal"]) for n, s in state["heads"].items()}
        return cls(state["class_names"], heads, {n: s["temperature"] for n, s in state["heads"].items()}, conformal, state["alpha"])

    def save(self, path: Union[str, Path]) -> Path:
        """Write the set to ``path`` (atomically) and its ``.sha256`` manifest."""
        path = atomic_write(path, lambda tmp: torch.save(self.state_dict(), tmp))
        write_checksum(path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "HeadSet":
        path = Path(path)
        if not path.is_file():
            raise HeadError(f"{path}: no saved heads there; give the heads file a run wrote (model/heads.pt)")
        problem = checksum_problem(path)
        if problem:
            raise HeadError(f"{path}: {problem}; the file was changed or damaged after the run wrote it")
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def save_heads(heads: HeadSet, path: Union[str, Path]) -> Path:
    return heads.save(path)


def load_heads(path: Union[str, Path]) -> HeadSet:
    return HeadSet.load(path)


def fit_heads(train: Split, val: Optional[Split], class_names: Sequence[str], *, heads: Sequence[str],
              class_text_embeds: Any = None, logit_scale: float = 1.0, calibrate: bool = True, alpha: float = 0.1,
              score: str = "lac", mondrian: bool = False, grids: Optional[Dict[str, Dict[str, Any]]] = None) -> HeadSet:
    """Fit each of ``heads`` on ``train`` (hyper-parameters chosen on ``val``), then its temperature and
    conformal calibration on ``val``. ``train``/``val``: ``(embeddings, labels)``; for an exemplar bank,
    ``train`` is the exemplars (see :func:`~clipexp.heads.shots.split_exemplars` to hold some out as ``val``)
    and ``class_text_embeds`` the prompt embeddings of its classes (zero_shot and tip need them)."""
    names, c = head_names(heads), len(class_names)
    tr, va = labelled(train, c, "training"), labelled(val, c, "validation")
    if va is not None and not va[1].numel():
        va = None
    fitted, temps, conf = {}, {}, {}
    for name in names:
        head = build_head(name, c, class_embeds=class_text_embeds, scale=logit_scale, **(grids or {}).get(name, {}))
        head.fit(tr[0], tr[1], *(va if va is not None else (None, None)))
        fitted[name], temps[name], conf[name] = head, 1.0, None
        if va is not None:
            logits = head.scores(va[0])
            temps[name] = fit_temperature(logits, va[1]) if calibrate else 1.0
            conf[name] = SplitConformal(score, mondrian).fit(probabilities(logits, temps[name]), va[1])
    return HeadSet(class_names, fitted, temps, conf, alpha)
