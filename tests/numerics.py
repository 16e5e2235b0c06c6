"""Float32 comparisons that hold on any x86 CPU and with any thread count.

The suite makes two kinds of numerical claims, and says at each which one it makes:

* **exact** (``torch.equal``, ``rtol=0, atol=0``): the *same* operations on the same inputs in the same
  order: a save/load round trip, a cache hit, a resume, an OOM retry with the same split, the copies of a
  packed caption. These are bit-identical on any machine.
* **close** (:func:`assert_close`): the same maths summed in another float32 order: caption packing
  (other sequence lengths), micro-batches (other matrix shapes), DDP (a sum over ranks), gradient
  checkpointing, another CPU's SIMD width or another thread count. The error of such a sum grows with the
  magnitude of what is summed, not with each entry, so every entry is compared within ``rel`` times the
  largest magnitude of the tensor compared (``rtol=0``). A bare absolute tolerance is wrong both ways: too
  tight on gradients of ~15 (an AMD EPYC differs by 5e-6 there), meaningless on values of ~1e-6.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

EPS = torch.finfo(torch.float32).eps  # 1.19e-7

# Same maths, another summation order: ~84 float32 eps of the largest entry compared. On a 2-core AMD EPYC,
# with 1 and with 2 threads, the worst such difference in the suite is 8.5e-7 (the gradients after an OOM
# halved GradCache's micro-batches); caption packing, which failed with a bare atol=2e-6, differs by 3.7e-7.
REORDER = 1e-5


def eps_times(n: int, slack: float = 4.0) -> float:
    """A relative tolerance for a float32 reduction over ``n`` terms: ``slack * eps * n`` (the worst-case
    bound of a sum computed in another order, relative to the sum of the magnitudes)."""
    return slack * EPS * n


def scale_of(*tensors: torch.Tensor) -> float:
    """The largest magnitude among ``tensors`` (the scale a float32 rounding error is relative to)."""
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REORDER, scale: Optional[float] = None,
                 name: str = "") -> None:
    """Every entry of ``actual`` within ``rel * scale`` of ``expected``, ``scale`` defaulting to the largest
    magnitude in ``expected``; shapes and dtypes must match."""
    scale = scale_of(expected) if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * scale,
                               msg=lambda m: f"{name + ': ' if name else ''}{m} (tolerance {rel:g} x max-abs {scale:.3g})")


def assert_all_close(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rel: float = REORDER) -> None:
    """:func:`assert_close` for each tensor of two dicts with the same, non-empty keys (gradients by parameter
    name), all against the largest magnitude in ``expected``. One scale for the whole step, not one per
    tensor: a gradient that is zero in exact arithmetic (a key bias: softmax ignores it) is rounding noise
    of the magnitudes upstream, ~1e-8 here, and has no scale of its own."""
    assert actual.keys() == expected.keys() and expected, (sorted(actual)[:5], sorted(expected)[:5])
    scale = scale_of(*expected.values())
    for name, want in expected.items():
        assert_close(actual[name], want, rel=rel, scale=scale, name=name)
