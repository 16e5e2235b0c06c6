"""The five heads against numbers derived by hand, scikit-learn fitted directly, and a save/load round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipexp.evaluate import zero_shot_classify
from clipexp.heads import HeadError, build_head, head_from_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prototype_on_four_2d_embeddings_by_hand():
    # class 0: (1, 0), (0, 1) -> mean (0.5, 0.5) -> prototype (1, 1)/sqrt 2
    # class 1: (-1, 0), (0.6, -0.8) -> mean (-0.2, -0.4) -> prototype (-1, -2)/sqrt 5
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]])
    head = build_head("prototype", 2, scale=10.0).fit(train, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(head.prototypes, torch.tensor([[1.0, 1.0], [-1.0, -2.0]]) / torch.tensor([[2 ** 0.5], [5 ** 0.5]]))
    # the query (3, 4) is normalised to (0.6, 0.8): 10 (0.6 + 0.8)/sqrt 2 = 7 sqrt 2 and 10 (-0.6 - 1.6)/sqrt 5 = -22/sqrt 5
    scores = head.scores(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    expected = torch.tensor([[7 * 2 ** 0.5, -22 / 5 ** 0.5], [-10 / 2 ** 0.5, 20 / 5 ** 0.5]])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)


def test_knn_similarity_weighted_laplace_smoothed_votes_by_hand():
    # tau = 1 / ln 2 makes the weights exp(cos / tau) = 2^cos; relative to the nearest: 2^(cos - cos_max)
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    head = build_head("knn", 2, ks=[3], tau=1 / math.log(2)).fit(bank, torch.tensor([0, 0, 1, 1]))
    assert head.chosen == {"k": 4}  # no validation: the default k, 10, capped by the bank's 4 entries
    head.k = 3
    # query (0.6, 0.8): cosines 0.6 (c0), 0.8 (c0), -0.6 (c1), -0.8 (c1); the 3 nearest: 0.8, 0.6, -0.6
    w0, w1 = 1 + 2 ** -0.2, 2 ** -1.4
    share0, share1 = w0 / (w0 + w1), w1 / (w0 + w1)
    expected = torch.tensor([[math.log((3 * share0 + 1) / 5), math.log((3 * share1 + 1) / 5)]])
    got = head.scores(torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert float(got.exp().sum()) == pytest.approx(1.0, abs=1e-6)  # smoothed shares are probabilities


def test_knn_chooses_k_on_validation():
    # val point (0.28, 0.96): its nearest is class 1 at (0, 1) (cos 0.96), then class 0 at (0.6, 0.8) (0.936)
    # and (0.8, 0.6) (0.8). With 2^cos weights k=3 votes 2^-0.024 + 2^-0.16 = 1.88 for class 0 against 1.
    bank = torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1])
    val = torch.tensor([[0.28, 0.96]])
    fit = lambda val_label: build_head("knn", 2, ks=[1, 3], tau=1 / math.log(2)).fit(bank, labels, val, torch.tensor([val_label]))
    assert fit(0).chosen == {"k": 3}
    assert fit(1).chosen == {"k": 1}  # both right: the first of the grid


def test_tip_adapter_logits_by_hand():
    # keys (1, 0) class 0 and (0, 1) class 1; prompts t0 = (1, 0), t1 = (0, 1); scale 2; query (0.6, 0.8):
    # zero-shot 2 x (0.6, 0.8); affinities exp(-beta (1 - 0.6)), exp(-beta (1 - 0.8))
    keys, text = torch.eye(2), torch.eye(2)
    head = build_head("tip", 2, class_embeds=text, scale=2.0).fit(keys, torch.tensor([0, 1]))
    assert (head.alpha, head.beta) == (1.17, 1.0)  # no validation: Tip-Adapter's ImageNet setting
    expected = torch.tensor([[1.2 + 1.17 * math.exp(-0.4), 1.6 + 1.17 * math.exp(-0.2)]])
    torch.testing.assert_close(head.scores(torch.tensor([[0.6, 0.8]])), expected, rtol=0, atol=1e-6)


def test_tip_adapter_chooses_alpha_and_beta_on_validation():
    # swapped prompts: zero-shot calls (1, 0) class 1; the cache (keys right) corrects it once alpha is large:
    # alpha 10: class 0 gets 0 + 10 e^0 = 10, class 1 gets 2 + 10 e^-beta (beta 1: 5.68; beta 0.01: 11.9)
    keys, swapped = torch.eye(2), torch.eye(2).flip(0)
    fit = lambda label: build_head("tip", 2, class_embeds=swapped, scale=2.0, alphas=[0.0, 10.0], betas=[0.01, 1.0]).fit(
        keys, torch.tensor([0, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([label]))
    assert fit(0).chosen == {"alpha": 10.0, "beta": 1.0}
    assert fit(1).chosen == {"alpha": 0.0, "beta": 0.01}  # zero-shot already right: the grid's first


def test_zero_shot_head_is_the_scaled_cosine_and_todays_rule():
    g = torch.Generator().manual_seed(0)
    x, text = F.normalize(torch.randn(50, 8, generator=g), dim=-1), F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    head = build_head("zero_shot", 4, class_embeds=text, scale=14.0).fit(x[:0], torch.zeros(0, dtype=torch.long))
    scores = head.scores(x)
    torch.testing.assert_close(scores, 14.0 * x @ text.T, rtol=0, atol=1e-5)
    assert torch.equal(scores.argmax(dim=1), zero_shot_classify(x, text))


def _blobs(n, classes=3, dim=6, seed=0, spread=0.8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + spread * rng.normal(size=(n, dim))
    return F.normalize(torch.tensor(x, dtype=torch.float32), dim=-1), torch.tensor(y)


@pytest.mark.parametrize("classes", [3, 2])
def test_linear_probe_equals_logistic_regression_fitted_directly(classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    (x, y), (vx, vy), (tx, _) = _blobs(150, classes, seed=1), _blobs(60, classes, seed=2), _blobs(40, classes, seed=3)
    cs = [0.01, 0.1, 1.0, 100.0]
    head = build_head("linear", classes, cs=cs).fit(x, y, vx, vy)
    feats = lambda t: t.double().numpy()
    val_acc = [balanced_accuracy_score(vy.numpy(), LogisticRegression(C=c, max_iter=1000).fit(feats(x), y.numpy()).predict(feats(vx)))
               for c in cs]
    assert head.chosen == {"C": cs[int(np.argmax(val_acc))]}
    ref = LogisticRegression(C=head.c, max_iter=1000).fit(feats(x), y.numpy())
    probs = torch.softmax(head.scores(tx).double(), dim=1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(feats(tx)), rtol=0, atol=1e-5)
    assert (probs.argmax(axis=1) == ref.predict(feats(tx))).all()


def test_every_head_survives_a_weights_only_save_and_load(tmp_path):
    (x, y), (vx, vy), (tx, _) = _blobs(60, seed=4), _blobs(30, seed=5), _blobs(20, seed=6)
    text = F.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(7)), dim=-1)
    for kind in ("zero_shot", "prototype", "knn", "linear", "tip"):
        head = build_head(kind, 3, class_embeds=text, scale=20.0).fit(x, y, vx, vy)
        torch.save(head.state_dict(), tmp_path / f"{kind}.pt")
        loaded = head_from_state(torch.load(tmp_path / f"{kind}.pt", weights_only=True))
        assert type(loaded) is type(head) and loaded.chosen == head.chosen
        assert torch.equal(loaded.scores(tx), head.scores(tx)), kind  # exact: the same operations on the same tensors


def test_a_class_without_training_embeddings_is_one_line():
    with pytest.raises(HeadError, match=r"head prototype: class index 2 has no training embedding") as err:
        build_head("prototype", 3, scale=1.0).fit(torch.eye(3)[:2], torch.tensor([0, 1]))
    assert "\n" not in str(err.value)
    with pytest.raises(HeadError, match="class indices must be in"):
        build_head("knn", 2).fit(torch.eye(3), torch.tensor([0, 1, 2]))
    with pytest.raises(HeadError, match="needs the class prompt embeddings"):
        build_head("tip", 2)
    head = build_head("prototype", 2, scale=1.0).fit(torch.eye(2), torch.tensor([0, 1]))
    with pytest.raises(HeadError, match=r"embeddings: row 1 is not finite \(NaN or inf; 1 rows in all\)"):
        head.scores(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))
