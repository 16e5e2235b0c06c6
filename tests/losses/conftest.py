"""Helpers for the loss tests: embeddings with a chosen similarity matrix, and hand arithmetic.

Tolerances in these tests: a loss computed in float32 over at most 8 x 8 logits against the same formula
in float64 by hand (``math``) is compared with ``pytest.approx(rel=1e-6)``, about 8 float32 eps, above
the eps-times-terms bound of those short reductions and independent of the CPU (no reduction here is
long enough to be split across threads). ``torch.equal`` marks the same computation reached two ways
(e.g. a loss with every weight 1 and the plain loss): exact on any machine.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

# A 3x3 similarity matrix whose columns are unit vectors (0.8,0.6,0), (0.36,0.48,0.8), (0.48,0.64,0.6),
# so it is exactly image @ text.T for image = I_3 and text rows = those columns.
#   diagonal (positives): 0.8, 0.48, 0.6; every row and column has two distinct negatives.
S3 = [[0.8, 0.36, 0.48], [0.6, 0.48, 0.64], [0.0, 0.8, 0.6]]
# A symmetric 2x2 one: columns (0.8, 0.6) and (0.6, 0.8).
S2 = [[0.8, 0.6], [0.6, 0.8]]


def pair_from_similarity(similarity):
    """(image, text) unit embeddings with image @ text.T == similarity (columns must be unit norm)."""
    s = torch.tensor(similarity, dtype=torch.float32)
    image = torch.eye(s.shape[0])
    text = s.t().contiguous()
    assert torch.allclose(text.norm(dim=1), torch.ones(s.shape[0]))
    return image, text


def lse(*xs: float) -> float:
    """log(sum(exp(x))) written with math, for hand-computed expectations."""
    return math.log(sum(math.exp(x) for x in xs))


@pytest.fixture(name="lse")
def lse_fixture():
    return lse


@pytest.fixture(name="pair")
def pair_fixture():
    return pair_from_similarity


@pytest.fixture
def s3_pair():
    return pair_from_similarity(S3)


@pytest.fixture
def s2_pair():
    return pair_from_similarity(S2)


@pytest.fixture
def random_batch():
    """8 random unit embeddings with duplicate groups (0,0,1,2,2,2,3,4) and labels."""
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 16, generator=gen), dim=1)
    text = F.normalize(torch.randn(8, 16, generator=gen), dim=1)
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    return image, text, groups, labels
