"""Mixed precision, the GradScaler, fused AdamW and ``torch.compile`` through the real Trainer, each against an
independent reference, on CPU (the default suite) and on CUDA (``-m gpu``, ``make gpu-check``).

Every test runs the same maths on both devices with the same tolerance: the CPU run is what keeps a wrong
tolerance or a wrong reference from reaching a GPU (a GPU is lent to this project only now and then). Each
trains a few steps of the tiny model on the smoke set's real textile images (batch 8):

* bf16 autocast against the fp32 run from the same weights on the same batches: every step's loss within
  ``BF16_LOSS_REL`` (4 units of bf16 roundoff, 4 x 2^-8; measured on a 2-core AMD EPYC: 0.12-0.44%), and the
  parameters' total update pointing the same way (cosine >= ``BF16_UPDATE_COS``; measured 0.9985). The bf16 run
  must also differ from the fp32 one (autocast ran).
* fp16 autocast + GradScaler (on CPU: torch's fp16 autocast and CPU GradScaler, which clipexp does not offer
  there; the test enables them), with the scale growing after every good step so that overflows, skipped
  steps and the scale's state matter at every step: a skipped step leaves every parameter as it was and
  halves the scale, and a resume from the step-3 checkpoint ends bit-identical to the uninterrupted run, scaler
  state included (the checkpoint's scale is not a fresh scaler's, so a resume that dropped it would show). The step-1 loss (one fp16 forward) is within 4 units of fp16 roundoff of fp32's.
* AdamW (fused on CUDA, as clipexp runs it there): two steps equal a float64 textbook AdamW (decoupled weight
  decay, bias correction) applied to the gradients the trainer handed the optimizer, within ``ADAMW_REL`` (16
  float32 eps) of each tensor's largest entry; measured 1.8 eps. L2 instead of decoupled decay is off by 1.6e5
  eps, no bias correction by 5e7, eps inside the square root by 1.4e6.
* ``device.compile=true``: the first step's loss and gradients equal eager mode's within ``REORDER``
  (another summation order). On CPU compiling takes 37-106 s, so that half is ``slow``.

On CUDA, runs are not bit-reproducible when a kernel is not (atomics); the resume test then measures the
spread of two uninterrupted runs and holds the resume to it (``make gpu-check`` sets
``CUBLAS_WORKSPACE_CONFIG`` so that cuBLAS is deterministic).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch
from numerics import EPS, REORDER, assert_all_close

from clipexp.config.compose import compose as compose_and_validate
from clipexp.training.trainer import Trainer

BF16_UNIT = 2.0 ** -8    # unit roundoff of bfloat16 (8 significand bits)
FP16_UNIT = 2.0 ** -11   # of float16 (11)
BF16_LOSS_REL = 4 * BF16_UNIT
BF16_UPDATE_COS = 0.99
FP16_LOSS_REL = 4 * FP16_UNIT
ADAMW_REL = 16 * EPS     # float32 AdamW against float64, two steps: a few roundings of each parameter (measured 1.8)

BASE = ["experiment=smoke", "tracking.enabled=false", "data.num_workers=0", "trainer.eval_at_start=false",
        "trainer.eval_steps=1000", "trainer.progress=false", "trainer.save_steps=1000"]

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])
DEVICES = [pytest.param("cpu"), CUDA]


class _Stop(Exception):
    pass


def train(tmp_path: Path, device: str, *overrides: str, steps: int = 3) -> SimpleNamespace:
    """Train a run of ``steps`` steps on ``device`` and record the parameters before and after, each step's
    loss, the scaler's (scale, growth tracker) after each step, and what the optimizer was handed at each step
    (gradients, and per group lr / weight decay / betas / eps). The loop is left right after the last
    optimizer step: the evaluation, checkpoint and outputs that follow are not what these tests check (and a
    compiled model would compile its evaluation graphs too)."""
    cfg = compose_and_validate([*BASE, f"device.type={device}", f"trainer.max_steps={steps}", *overrides])
    trainer = Trainer(cfg, tmp_path).setup()
    rec = SimpleNamespace(trainer=trainer, scales=[], handed=[], after_step=[], losses=[])
    rec.before = _params(trainer.model)
    names = {id(p): n for n, p in trainer.model.named_parameters()}  # the loss's own parameters have none
    opt_step, update = trainer.optimizer.step, trainer.scaler.update

    def recording_step(*a, **k):
        rec.handed.append([{"grads": [(names.get(id(p)), None if p.grad is None else p.grad.detach().double().cpu().clone())
                                      for p in g["params"]],
                            **{key: g[key] for key in ("lr", "weight_decay", "betas", "eps")}}
                           for g in trainer.optimizer.param_groups])
        return opt_step(*a, **k)

    def recording_update(*a, **k):
        out = update(*a, **k)
        rec.scales.append((trainer.scaler.get_scale(), int(trainer.scaler._growth_tracker)) if trainer.scaler.is_enabled() else None)
        rec.after_step.append(_params(trainer.model))
        return out

    run_step = trainer.step

    def recording_run_step(batch):
        out = run_step(batch)
        rec.losses.append(float(out["loss"]))
        if len(rec.losses) == steps:  # the last optimizer step taken: leave before the evaluation and the outputs
            raise _Stop
        return out

    trainer.optimizer.step, trainer.scaler.update, trainer.step = recording_step, recording_update, recording_run_step
    try:
        trainer.train()
    except _Stop:
        pass
    finally:
        trainer.cleanup()
    rec.after = _params(trainer.model)
    return rec


@pytest.fixture(autouse=True, scope="module")
def _true_fp32():
    """fp32 references in fp32: cuDNN may run fp32 convolutions in TF32 (10-bit mantissa) by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _params(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def _flat(params: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[n].flatten() for n in sorted(params)])


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    """The fp32 reference of each device, trained once per module (3 steps)."""
    cache: Dict[str, SimpleNamespace] = {}

    def get(device: str) -> SimpleNamespace:
        if device not in cache:
            cache[device] = train(tmp_path_factory.mktemp(f"fp32_{device}"), device, "device.precision=fp32")
        return cache[device]

    return get


# ----------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_steps_track_the_fp32_reference(tmp_path, device, fp32_runs):
    ref = fp32_runs(device)
    bf16 = train(tmp_path, device, "device.precision=bf16")
    assert bf16.trainer.device_info.precision == "bf16" and ref.trainer.device_info.precision == "fp32"
    assert all(torch.equal(bf16.before[n], ref.before[n]) for n in ref.before)  # the same start
    assert all(p.dtype == torch.float32 for p in bf16.trainer.model.parameters())  # weights stay fp32
    rel = [abs(a - b) / abs(b) for a, b in zip(bf16.losses, ref.losses)]
    assert len(rel) == 3 and max(rel) <= BF16_LOSS_REL, rel
    assert max(rel) > 1e3 * EPS, rel  # not the fp32 numbers again: autocast ran
    update, ref_update = _flat(bf16.after) - _flat(bf16.before), _flat(ref.after) - _flat(ref.before)
    cos = float(torch.nn.functional.cosine_similarity(update, ref_update, dim=0))
    assert cos >= BF16_UPDATE_COS, cos


# ------------------------------------------------------------------------------- fp16 + GradScaler
@pytest.fixture
def fp16_everywhere(monkeypatch):
    """fp16 autocast and a GradScaler on every device (clipexp refuses fp16 on CPU: it is slow there, but
    torch runs the same maths), and a scale that grows after every good step (``growth_interval=1``; clipexp
    uses torch's 2000) so that it overflows again and again: skipped steps and the scale's state matter at
    every step of a short run."""
    from clipexp.device import DeviceManager

    real = torch.amp.GradScaler
    monkeypatch.setattr(DeviceManager, "capabilities", staticmethod(lambda kind: (True, True)))
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled=True: real(device, enabled=enabled, growth_interval=1))


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_grad_scaler_skips_overflows_and_resumes_exactly(tmp_path, device, fp16_everywhere, fp32_runs):
    fp16 = ["device.precision=fp16", "trainer.save_steps=3", "trainer.keep_last=10"]
    whole = train(tmp_path / "whole", device, *fp16, steps=6)
    assert whole.trainer.device_info.precision == "fp16" and whole.trainer.scaler.is_enabled()
    # the GradScaler's maths: an overflowing step changes no parameter and halves the scale; a good one doubles it
    scales = [s for s, _ in [(65536.0, 0)] + whole.scales]
    states = [whole.before] + whole.after_step
    skipped = [i + 1 for i in range(6) if scales[i + 1] < scales[i]]
    assert skipped, whole.scales
    assert whole.scales[2] != (65536.0, 0), whole.scales  # the step-3 checkpoint's scaler is not a fresh one: a resume must restore it
    for i in range(6):
        same = all(torch.equal(states[i][n], states[i + 1][n]) for n in states[i])
        assert same == (i + 1 in skipped), (i + 1, whole.scales)
        assert scales[i + 1] == scales[i] * (0.5 if i + 1 in skipped else 2.0)
    # one fp16 forward (step 1) against fp32's, from the same weights on the same batch
    ref = fp32_runs(device)
    assert abs(whole.losses[0] - ref.losses[0]) <= FP16_LOSS_REL * abs(ref.losses[0])
    assert whole.losses[0] != ref.losses[0]

    # resume from the step-3 checkpoint: steps 4-6 again, into another folder
    ckpt = tmp_path / "whole" / "checkpoints" / "step_0000003.pt"
    resumed = train(tmp_path / "resumed", device, *fp16, f"trainer.resume={ckpt}", steps=6)
    assert len(resumed.losses) == 3 and resumed.scales == whole.scales[3:]  # steps 4-6, the same scales
    assert resumed.trainer.scaler.state_dict() == whole.trainer.scaler.state_dict()
    if device == "cpu":  # exact: the same operations on the same numbers
        assert resumed.losses == whole.losses[3:]
        assert all(torch.equal(resumed.after[n], whole.after[n]) for n in whole.after)
    else:  # CUDA: as close as two uninterrupted runs are to each other (bit-identical when every kernel is deterministic)
        again = train(tmp_path / "again", device, *fp16, steps=6)
        spread = _max_diff(again.after, whole.after)
        assert _max_diff(resumed.after, whole.after) <= 2 * spread, spread


# ---------------------------------------------------------------------------------------- AdamW
def _grads(rec: SimpleNamespace, step: int) -> Dict[str, torch.Tensor]:
    """The model's gradients the optimizer was handed at ``step`` (1-based), by parameter name."""
    return {n: grad for g in rec.handed[step - 1] for n, grad in g["grads"] if n is not None and grad is not None}


def _adamw_reference(before: Dict[str, torch.Tensor], handed: List[list]) -> Dict[str, torch.Tensor]:
    """Textbook AdamW in float64 (decoupled weight decay, bias-corrected moments) over the handed gradients."""
    theta = {n: t.double().clone() for n, t in before.items()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    for t, groups in enumerate(handed, start=1):
        for g in groups:
            b1, b2 = g["betas"]
            for n, grad in g["grads"]:
                if grad is None or n is None:
                    continue
                theta[n] *= 1 - g["lr"] * g["weight_decay"]
                m[n] = b1 * m[n] + (1 - b1) * grad
                v[n] = b2 * v[n] + (1 - b2) * grad * grad
                m_hat, v_hat = m[n] / (1 - b1 ** t), v[n] / (1 - b2 ** t)
                theta[n] -= g["lr"] * m_hat / (v_hat.sqrt() + g["eps"])
    return theta


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_steps_equal_a_float64_textbook_adamw(tmp_path, device):
    rec = train(tmp_path, device, "device.precision=fp32", "trainer.fused_adamw=true", steps=2)
    assert bool(rec.trainer.optimizer.defaults["fused"]) == (device == "cuda")  # fused where clipexp fuses it
    assert {g["weight_decay"] for g in rec.handed[0]} == {0.0, rec.trainer.cfg.trainer.weight_decay}
    want = _adamw_reference(rec.before, rec.handed)
    for n, got in rec.after.items():  # each tensor against its own largest entry (float32 rounds each parameter)
        assert float((got.double() - want[n]).abs().max()) <= ADAMW_REL * float(want[n].abs().max()), n
    # every parameter with a gradient moved (the fixed temperature's logit_scale has none and stays)
    with_grad = set(_grads(rec, 1))
    assert len(with_grad) > 70 and {n for n in rec.after if not torch.equal(rec.after[n], rec.before[n])} == with_grad


# -------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_compiled_step_matches_eager(tmp_path, device, fp32_runs):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(tmp_path, device, "device.precision=fp32", "device.compile=true", steps=1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both towers were captured
    eager = fp32_runs(device)
    assert math.isclose(compiled.losses[0], eager.losses[0], rel_tol=REORDER)
    assert_all_close({n: g.float() for n, g in _grads(compiled, 1).items()}, {n: g.float() for n, g in _grads(eager, 1).items()})
