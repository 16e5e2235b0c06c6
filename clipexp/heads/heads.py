"""Classifiers ("heads") on L2-normalised image embeddings: each is fitted on training embeddings and their
integer labels and returns class scores (logits) ``[M, C]`` for new embeddings, so every model family gets
the same heads. ``s`` is the model's logit scale (1 / its temperature), ``x`` an embedding (unit length).

==========  ==================================================================  ===============================
head        scores of class c                                                   chosen on validation
==========  ==================================================================  ===============================
zero_shot   ``s * x.t_c`` (``t_c``: the class's prompt embedding)               -
prototype   ``s * x.m_c`` (``m_c``: the normalised mean of class c's embeddings) -
knn         ``log((k * share_c + 1) / (k + C))``: ``share_c`` is class c's      k in ``KNN_KS``
            share of the weights ``exp(x.x_j / tau)`` of the k nearest ``x_j``
            (cosine; tau = 0.07): similarity-weighted votes, Laplace-smoothed
linear      ``W x + b``: scikit-learn ``LogisticRegression`` (L2, lbfgs)        C in ``LINEAR_CS``
tip         ``s * x.t_c + alpha * sum_j exp(-beta (1 - x.x_j)) [y_j = c]``      alpha, beta in ``TIP_*``
            (Tip-Adapter's training-free cache, Zhang et al. 2022)
==========  ==================================================================  ===============================

A hyper-parameter is chosen by the validation split's balanced accuracy (the first of the grid's best on a
tie); without a validation split the ``*_DEFAULT`` value is used. Each head's ``state_dict()`` holds plain
tensors, numbers and lists, so ``torch.load(weights_only=True)`` reads it and :func:`head_from_state`
rebuilds the head.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clipexp.errors import UserError
from clipexp.heads.metrics import balanced_accuracy

KNN_KS = (1, 3, 5, 10, 20, 50)
KNN_K_DEFAULT = 10
KNN_TAU = 0.07  # the weighted kNN of Wu et al. 2018 / DINO
LINEAR_CS = tuple(float(c) for c in np.logspace(-2, 4, 13))  # 0.01 ... 10^4, half a decade apart
LINEAR_C_DEFAULT = 1.0
LINEAR_MAX_ITER = 1000
TIP_ALPHAS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
TIP_BETAS = (0.5, 1.0, 2.0, 3.5, 5.5, 7.0, 10.0)
TIP_DEFAULT = (1.17, 1.0)  # (alpha, beta): Tip-Adapter's ImageNet setting (configs/imagenet.yaml)
_CHUNK_ELEMENTS = 1 << 24  # rows x bank entries scored at once (64 MiB of float32 similarities)


class HeadError(UserError, ValueError):
    """Embeddings or labels a head cannot use (a class without a training embedding, a wrong shape)."""


def embeddings(emb: Any, what: str = "embeddings") -> Tensor:
    """``emb`` as a float32 ``[N, D]`` tensor, L2-normalised (idempotent on unit-length rows)."""
    emb = torch.as_tensor(emb).float()
    if emb.ndim != 2:
        raise HeadError(f"{what} must be a 2-D [N, D] array; got shape {tuple(emb.shape)}")
    bad = (~torch.isfinite(emb).all(dim=1)).nonzero()
    if len(bad):
        raise HeadError(f"{what}: row {int(bad[0])} is not finite (NaN or inf; {len(bad)} rows in all): leave out "
                        "the images that could not be read")
    return F.normalize(emb, dim=-1)


def class_labels(labels: Any, n: int, num_classes: int, what: str = "labels") -> Tensor:
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() != n:
        raise HeadError(f"{what}: {labels.numel()} labels for {n} embeddings; give one class index per embedding")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise HeadError(f"{what}: class indices must be in [0, {num_classes}); got {int(labels.min())} .. {int(labels.max())}")
    return labels


def _chunks(emb: Tensor, bank_size: int) -> List[Tensor]:
    """``emb`` in row blocks small enough that a block's similarities to a bank of ``bank_size`` fit in 64 MiB."""
    step = max(1, _CHUNK_ELEMENTS // max(1, bank_size))
    return [emb[s:s + step] for s in range(0, emb.shape[0], step)] or [emb]


def _pick(candidates: Iterable[Any], val_labels: Tensor, num_classes: int, logits_of: Callable[[Any], Tensor]) -> Any:
    """The first candidate with the highest validation balanced accuracy."""
    best, best_acc = None, -1.0
    for cand in candidates:
        acc = balanced_accuracy(logits_of(cand).argmax(dim=1), val_labels, num_classes)
        if acc > best_acc:
            best, best_acc = cand, acc
    return best


class Head:
    """``fit(train_emb, train_labels, val_emb=None, val_labels=None) -> self``, ``scores(emb) -> [M, C]``,
    ``state_dict()``; ``chosen`` holds the hyper-parameters validation picked (``{"k": 5}``)."""

    kind = ""
    needs_training = True  # False: the head only needs the class prompt embeddings (zero_shot)

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.chosen: Dict[str, float] = {}

    def fit(self, train_emb: Any, train_labels: Any, val_emb: Any = None, val_labels: Any = None) -> "Head":
        x = embeddings(train_emb, f"{self.kind}: training embeddings")
        y = class_labels(train_labels, x.shape[0], self.num_classes, f"{self.kind}: training labels")
        missing = sorted(set(range(self.num_classes)) - set(y.tolist()))
        if self.needs_training and missing:
            raise HeadError(f"head {self.kind}: class index {missing[0]} has no training embedding "
                            f"({len(missing)} of {self.num_classes} classes have none); give each class at least one")
        val = None
        if val_emb is not None and val_labels is not None:
            vx = embeddings(val_emb, f"{self.kind}: validation embeddings")
            vy = class_labels(val_labels, vx.shape[0], self.num_classes, f"{self.kind}: validation labels")
            val = (vx, vy) if vy.numel() else None
        self._fit(x, y, val)
        return self

    def _fit(self, x: Tensor, y: Tensor, val: Optional[Tuple[Tensor, Tensor]]) -> None:
        raise NotImplementedError

    def scores(self, emb: Any) -> Tensor:
        return self._scores(embeddings(emb))

    def _scores(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _params(self) -> Dict[str, Any]:
        return {"num_classes": self.num_classes}

    def _fitted(self) -> Dict[str, Any]:
        return {}

    def _load(self, fitted: Dict[str, Any]) -> None:
        for key, value in fitted.items():
            setattr(self, key, value)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "params": self._params(), "fitted": self._fitted(), "chosen": dict(self.chosen)}


class ZeroShotHead(Head):
    """Today's zero-shot rule: the scaled cosine with each class's prompt-ensemble text embedding."""

    kind = "zero_shot"
    needs_training = False

    def __init__(self, class_embeds: Any, scale: float):
        self.class_embeds = embeddings(class_embeds, "class text embeddings")
        super().__init__(self.class_embeds.shape[0])
        self.scale = float(scale)

    def _fit(self, x, y, val):
        pass

    def _scores(self, x):
        return self.scale * (x @ self.class_embeds.T)

    def _params(self):
        return {"class_embeds": self.class_embeds, "scale": self.scale}


class PrototypeHead(Head):
    """Nearest class mean (cosine): each class's prototype is the normalised mean of its embeddings."""

    kind = "prototype"

    def __init__(self, num_classes: int, scale: float):
        super().__init__(num_classes)
        self.scale = float(scale)
        self.prototypes: Optional[Tensor] = None

    def _fit(self, x, y, val):
        sums = torch.zeros(self.num_classes, x.shape[1]).index_add_(0, y, x)
        self.prototypes = F.normalize(sums, dim=-1)  # the mean's direction: dividing by the count changes nothing

    def _scores(self, x):
        return self.scale * (x @ self.prototypes.T)

    def _params(self):
        return {"num_classes": self.num_classes, "scale": self.scale}

    def _fitted(self):
        return {"prototypes": self.prototypes}


def _knn_logits(top_sims: Tensor, top_labels: Tensor, k: int, tau: float, num_classes: int) -> Tensor:
    sims, labels = top_sims[:, :k], top_labels[:, :k]
    weights = torch.exp((sims - sims[:, :1]) / tau)  # relative to the nearest: the shares are unchanged
    votes = torch.zeros(sims.shape[0], num_classes).scatter_add_(1, labels, weights)
    share = votes / votes.sum(dim=1, keepdim=True)
    return torch.log((k * share + 1.0) / (k + num_classes))


class KNNHead(Head):
    """k nearest training embeddings (cosine), similarity-weighted votes (weights ``exp(cos / tau)``) turned
    into Laplace-smoothed log shares, so no class has probability 0 and temperature scaling applies."""

    kind = "knn"

    def __init__(self, num_classes: int, ks: Sequence[int] = KNN_KS, tau: float = KNN_TAU):
        super().__init__(num_classes)
        self.ks, self.tau = [int(k) for k in ks], float(tau)
        self.bank: Optional[Tensor] = None
        self.bank_labels: Optional[Tensor] = None
        self.k = KNN_K_DEFAULT

    def _top(self, x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """Similarities ``[M, k]`` of the k nearest bank entries, most similar first, and their labels."""
        k = min(k, self.bank.shape[0])
        parts = [(c @ self.bank.T).topk(k, dim=1) for c in _chunks(x, self.bank.shape[0])]
        return torch.cat([p.values for p in parts]), self.bank_labels[torch.cat([p.indices for p in parts])]

    def _fit(self, x, y, val):
        self.bank, self.bank_labels = x, y
        candidates = [k for k in self.ks if k <= x.shape[0]] or [x.shape[0]]
        if val is None:
            self.k = min(KNN_K_DEFAULT, x.shape[0])
        else:
            top = self._top(val[0], max(candidates))
            self.k = _pick(candidates, val[1], self.num_classes, lambda k: _knn_logits(*top, k, self.tau, self.num_classes))
        self.chosen = {"k": self.k}

    def _scores(self, x):
        k = min(self.k, self.bank.shape[0])
        return _knn_logits(*self._top(x, k), k, self.tau, self.num_classes)

    def _params(self):
        return {"num_classes": self.num_classes, "ks": self.ks, "tau": self.tau}

    def _fitted(self):
        return {"bank": self.bank, "bank_labels": self.bank_labels, "k": self.k}


class LinearProbeHead(Head):
    """Multinomial logistic regression on the embeddings (the CLIP paper's and clip_benchmark's linear probe):
    scikit-learn's ``LogisticRegression(C, lbfgs)``, fitted on the training split only (validation picks C and
    stays out of the fit, so it can calibrate the probe afterwards)."""

    kind = "linear"

    def __init__(self, num_classes: int, cs: Sequence[float] = LINEAR_CS, max_iter: int = LINEAR_MAX_ITER):
        super().__init__(num_classes)
        self.cs, self.max_iter = [float(c) for c in cs], int(max_iter)
        self.weight: Optional[Tensor] = None
        self.bias: Optional[Tensor] = None
        self.c = LINEAR_C_DEFAULT

    def _fit(self, x, y, val):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        xs, ys = x.double().numpy(), y.numpy()
        with warnings.catch_warnings():  # a weakly regularised probe on separable data stops at max_iter: fine here
            warnings.simplefilter("ignore", ConvergenceWarning)
            if val is not None:  # the grid in order, each fit starting from the previous one's solution (half the time)
                path, vx = LogisticRegression(max_iter=self.max_iter, warm_start=True), val[0].double().numpy()
                logits_of = lambda c: torch.from_numpy(path.set_params(C=c).fit(xs, ys).decision_function(vx)).reshape(len(vx), -1)
                self.c = _pick(self.cs, val[1], self.num_classes, logits_of)
            model = LogisticRegression(C=self.c, max_iter=self.max_iter).fit(xs, ys)  # cold: exactly a direct fit at C
        weight = torch.zeros(self.num_classes, x.shape[1], dtype=torch.float64)
        bias = torch.zeros(self.num_classes, dtype=torch.float64)
        classes = torch.as_tensor(model.classes_).long()
        coef, intercept = torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_)
        if len(classes) == 2:  # scikit-learn keeps one row (class 1 vs 0): softmax([0, z]) = sigmoid(z)
            weight[classes[1]], bias[classes[1]] = coef[0], intercept[0]
        else:
            weight[classes], bias[classes] = coef, intercept
        self.weight, self.bias = weight.float(), bias.float()
        self.chosen = {"C": self.c}

    def _scores(self, x):
        return (x.double() @ self.weight.double().T + self.bias.double()).float()

    def _params(self):
        return {"num_classes": self.num_classes, "cs": self.cs, "max_iter": self.max_iter}

    def _fitted(self):
        return {"weight": self.weight, "bias": self.bias, "c": self.c}


class TipAdapterHead(Head):
    """Tip-Adapter's training-free cache (Zhang et al. 2022): the zero-shot logits plus ``alpha`` times the
    training embeddings' affinities ``exp(-beta (1 - cos))`` summed per class (keys: embeddings, values: one-hot
    labels)."""

    kind = "tip"

    def __init__(self, class_embeds: Any, scale: float, alphas: Sequence[float] = TIP_ALPHAS, betas: Sequence[float] = TIP_BETAS):
        self.class_embeds = embeddings(class_embeds, "class text embeddings")
        super().__init__(self.class_embeds.shape[0])
        self.scale = float(scale)
        self.alphas, self.betas = [float(a) for a in alphas], [float(b) for b in betas]
        self.keys: Optional[Tensor] = None
        self.key_labels: Optional[Tensor] = None
        self.alpha, self.beta = TIP_DEFAULT

    def _affinity(self, x: Tensor, beta: float) -> Tensor:
        """``exp(-beta (1 - x.keys)) @ one_hot(labels)`` ``[M, C]``, a row block at a time."""
        values = F.one_hot(self.key_labels, self.num_classes).float()
        return torch.cat([torch.exp(-beta * (1.0 - c @ self.keys.T)) @ values for c in _chunks(x, self.keys.shape[0])])

    def _fit(self, x, y, val):
        self.keys, self.key_labels = x, y
        if val is not None:
            zero_shot = self.scale * (val[0] @ self.class_embeds.T)
            cache = {beta: self._affinity(val[0], beta) for beta in self.betas}
            grid = [(a, b) for b in self.betas for a in self.alphas]
            self.alpha, self.beta = _pick(grid, val[1], self.num_classes, lambda ab: zero_shot + ab[0] * cache[ab[1]])
        self.chosen = {"alpha": self.alpha, "beta": self.beta}

    def _scores(self, x):
        return self.scale * (x @ self.class_embeds.T) + self.alpha * self._affinity(x, self.beta)

    def _params(self):
        return {"class_embeds": self.class_embeds, "scale": self.scale, "alphas": self.alphas, "betas": self.betas}

    def _fitted(self):
        return {"keys": self.keys, "key_labels": self.key_labels, "alpha": self.alpha, "beta": self.beta}


HEAD_TYPES = {cls.kind: cls for cls in (ZeroShotHead, PrototypeHead, KNNHead, LinearProbeHead, TipAdapterHead)}
NEEDS_TEXT = ("zero_shot", "tip")  # heads built on the class prompt embeddings


def build_head(kind: str, num_classes: int, *, class_embeds: Any = None, scale: float = 1.0, **grid: Any) -> Head:
    """An unfitted head of ``kind`` (one of :data:`clipexp.names.HEADS`); ``grid`` overrides its search grid
    (``ks=``, ``cs=``, ``alphas=``, ``betas=``)."""
    if kind not in HEAD_TYPES:
        raise HeadError(f"unknown head {kind!r}: use one of {', '.join(HEAD_TYPES)}")
    if kind in NEEDS_TEXT:
        if class_embeds is None:
            raise HeadError(f"head {kind} needs the class prompt embeddings (class_text_embeds); give them or drop the head")
        head = HEAD_TYPES[kind](class_embeds, scale, **grid)
        if head.num_classes != num_classes:
            raise HeadError(f"head {kind}: {head.num_classes} class prompt embeddings for {num_classes} classes")
        return head
    return PrototypeHead(num_classes, scale) if kind == "prototype" else HEAD_TYPES[kind](num_classes, **grid)


def head_from_state(state: Dict[str, Any]) -> Head:
    """The head a :meth:`Head.state_dict` describes (as ``torch.load(..., weights_only=True)`` returns it)."""
    kind = state.get("kind")
    if kind not in HEAD_TYPES:
        raise HeadError(f"a saved head of unknown kind {kind!r}: it was written by another clipexp version")
    head = HEAD_TYPES[kind](**state["params"])
    head._load(state["fitted"])
    head.chosen = dict(state.get("chosen", {}))
    return head


def head_names(heads: Sequence[str]) -> List[str]:
    """``heads`` checked against :data:`HEAD_TYPES`, duplicates dropped, order kept."""
    out: List[str] = []
    for h in heads:
        if h not in HEAD_TYPES:
            raise HeadError(f"unknown head {h!r}: use one of {', '.join(HEAD_TYPES)}")
        if h not in out:
            out.append(h)
    return out
