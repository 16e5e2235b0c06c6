"""OOM detection, batch-size search/cache/estimate/resolution, OOM recovery and batch splitting."""

from __future__ import annotations

import json
from typing import List

import pytest
import torch

from clipexp.errors import BatchTooLargeError, UserError
from clipexp.training.memory import (DEFAULT_FALLBACK, BatchSizeCache, MicroBatches, attempt, estimate_batch_size,
                                     estimate_batch_size_for_model, find_max_batch_size, free_memory, is_oom, make_train_step_probe,
                                     resolve_batch_size, split_batch)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- is_oom


def _real_cpu_oom() -> RuntimeError:
    try:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: the allocator refuses at once
    except RuntimeError as err:
        return err
    pytest.skip("this machine allocated 1 PiB")


@pytest.mark.parametrize("err", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.cuda.OutOfMemoryError("whatever the message"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total capacity)"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.2 GB)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    MemoryError(),
], ids=["torch", "torch.cuda", "cuda-msg", "mps", "cpu-msg", "cublas", "MemoryError"])
def test_is_oom_recognises_out_of_memory(err):
    assert is_oom(err)


def test_is_oom_on_a_real_cpu_allocator_failure():
    err = _real_cpu_oom()
    assert "DefaultCPUAllocator" in str(err) and is_oom(err)


@pytest.mark.parametrize("err", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    ValueError("out of memory"),  # not a RuntimeError: a user's own ValueError is not an allocator failure
    KeyboardInterrupt(),
])
def test_is_oom_rejects_other_errors(err):
    assert not is_oom(err)


@pytest.mark.parametrize("device", ["cpu", None])
def test_free_memory_collects_tensors_held_only_by_reference_cycles(device):
    """What an out-of-memory retry needs from free_memory on any device: tensors that only a reference cycle still
    holds (a failed step's frames and autograd graph) are freed now, not at the garbage collector's next turn."""
    import gc
    import weakref

    gc.disable()
    try:
        cycle = {"activations": torch.empty(1 << 20)}
        cycle["self"] = cycle
        held = weakref.ref(cycle["activations"])
        del cycle
        assert held() is not None  # unreachable, but nothing has collected the cycle yet
        free_memory(device)
        assert held() is None
    finally:
        gc.enable()


# -------------------------------------------------------------------------------- find_max_batch_size


def _fake_probe(limit: int, error=torch.OutOfMemoryError):
    calls: List[int] = []

    def probe(batch_size: int) -> None:
        calls.append(batch_size)
        if batch_size > limit:
            raise error("CUDA out of memory. Tried to allocate 1.00 GiB")

    return probe, calls


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_finds_exactly_the_boundary_doubling_then_bisecting(error):
    probe, calls = _fake_probe(37, error)
    ooms: List[int] = []
    found = find_max_batch_size(probe, start=8, on_oom=lambda: ooms.append(calls[-1]))
    assert found == 37
    # doubling 8 -> 16 -> 32 -> 64 (OOM), then bisection of (32, 64): 48, 40, 36, 38, 37
    assert calls == [8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert ooms == [64, 48, 40, 38]  # on_oom after each OOM and only then


def test_start_that_does_not_fit_bisects_below_it():
    probe, calls = _fake_probe(5)
    assert find_max_batch_size(probe, start=8, on_oom=None) == 5
    assert calls == [8, 4, 6, 5]


def test_cap_is_respected_and_reachable():
    probe, calls = _fake_probe(10**9)
    assert find_max_batch_size(probe, start=8, max_batch=64, on_oom=None) == 64
    assert calls == [8, 16, 32, 64]
    probe, calls = _fake_probe(10**9)
    assert find_max_batch_size(probe, start=8, max_batch=100, on_oom=None) == 100
    assert calls == [8, 16, 32, 64, 100]
    probe, calls = _fake_probe(80)
    assert find_max_batch_size(probe, start=8, max_batch=100, on_oom=None) == 80
    assert calls == [8, 16, 32, 64, 100, 82, 73, 77, 79, 80, 81]


def test_batch_one_not_fitting_is_a_clear_error():
    probe, calls = _fake_probe(0)
    with pytest.raises(BatchTooLargeError, match="^out of memory at batch size 1; use a smaller model") as err:
        find_max_batch_size(probe, start=8, on_oom=None)
    assert isinstance(err.value, UserError)  # one line for the user, as a run that runs out of memory mid-way says
    assert calls == [8, 4, 2, 1]


def test_non_oom_errors_propagate():
    def probe(batch_size: int) -> None:
        if batch_size >= 32:
            raise ValueError("a bug, not a memory problem")

    with pytest.raises(ValueError, match="a bug"):
        find_max_batch_size(probe, start=8, on_oom=None)


def test_real_cpu_allocator_failure_drives_the_search():
    def probe(batch_size: int) -> None:
        if batch_size > 12:
            torch.empty(2**50, dtype=torch.uint8)

    assert find_max_batch_size(probe, start=4, on_oom=None) == 12


# ------------------------------------------------------------------------------ make_train_step_probe


@pytest.fixture(scope="module")
def tiny():
    from builders import loss_from_conf
    from clipexp.models.clip import ArchitectureConfig, build_model

    torch.manual_seed(0)
    return build_model(ArchitectureConfig(), 32, 16), loss_from_conf("contrastive", learnable_temp=True)


def _state(*modules):
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items() if torch.is_tensor(v)}


def test_train_step_probe_runs_a_step_and_leaves_the_run_unchanged(tiny):
    model, loss_fn = tiny
    model.eval()
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=0.1)
    before = _state(model, loss_fn)
    seen = {}
    real_step = optimizer.step

    def spy_step(*args, **kwargs):  # the step really happens, after a real backward
        seen["grads"] = sum(p.grad is not None for g in optimizer.param_groups for p in g["params"])
        seen["training"] = model.training
        out = real_step(*args, **kwargs)
        seen["moved"] = any(not torch.equal(v, before[f"0.{k}"]) for k, v in model.state_dict().items())
        return out

    optimizer.step = spy_step
    probe = make_train_step_probe(model, loss_fn, device="cpu", resolution=32, seq_len=16, optimizer=optimizer)
    probe(4)
    n_params = sum(1 for g in optimizer.param_groups for p in g["params"])
    assert seen["grads"] >= n_params - 1  # backward filled every gradient (model.logit_scale is unused here)
    assert seen["training"] and seen["moved"]  # train mode during the step, and the step moved weights
    after = _state(model, loss_fn)
    assert all(torch.equal(after[k], before[k]) for k in before)  # ... which were restored
    assert len(optimizer.state) == 0  # AdamW state emptied again: the run's first step is a first step
    assert all(p.grad is None for p in list(model.parameters()) + list(loss_fn.parameters()))
    assert not model.training  # the eval mode it had


def test_train_step_probe_restores_existing_optimizer_state(tiny):
    model, loss_fn = tiny
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.01)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before_params = _state(model, loss_fn)
    before_moments = {id(p): optimizer.state[p]["exp_avg"].clone() for p in params}
    make_train_step_probe(model, loss_fn, device="cpu", resolution=32, seq_len=16, optimizer=optimizer)(3)
    after = _state(model, loss_fn)
    assert all(torch.equal(after[k], before_params[k]) for k in before_params)
    assert all(torch.equal(optimizer.state[p]["exp_avg"], before_moments[id(p)]) for p in params)
    assert all(int(optimizer.state[p]["step"]) == 1 for p in params)


def test_train_step_probe_feeds_find_max_batch_size(tiny):
    model, loss_fn = tiny
    step = make_train_step_probe(model, loss_fn, device="cpu", resolution=32, seq_len=16)
    sizes: List[int] = []

    def probe(batch_size: int) -> None:  # a real step, with a fake memory limit of 6 samples
        sizes.append(batch_size)
        if batch_size > 6:
            raise torch.OutOfMemoryError("CUDA out of memory")
        step(batch_size)

    assert find_max_batch_size(probe, start=2, on_oom=None) == 6
    assert sizes == [2, 4, 8, 6, 7]
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------ BatchSizeCache


def test_cache_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "sub" / "batch_sizes.json"
    cache = BatchSizeCache(path)
    key = BatchSizeCache.key("clip_vit_b32", 224, "bf16", "NVIDIA H100", "seq77|gc=0")
    assert key == "clip_vit_b32|224|bf16|NVIDIA H100|seq77|gc=0"
    assert cache.get(key) is None
    cache.set(key, 384)
    cache.set("other|224|fp32|cpu|", 8)
    assert BatchSizeCache(path).get(key) == 384  # persisted, read by a new instance
    assert json.loads(path.read_text()) == {key: 384, "other|224|fp32|cpu|": 8}
    assert sorted(p.name for p in path.parent.iterdir()) == ["batch_sizes.json"]  # no temp file left behind
    with pytest.raises(ValueError):
        cache.set(key, 0)


def test_cache_default_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPEXP_CACHE_DIR", str(tmp_path / "c"))
    assert BatchSizeCache().path == tmp_path / "c" / "batch_sizes.json"
    monkeypatch.delenv("CLIPEXP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert BatchSizeCache().path == tmp_path / "home" / ".cache" / "clipexp" / "batch_sizes.json"


def test_corrupt_cache_counts_as_empty_and_is_rewritten(tmp_path):
    path = tmp_path / "batch_sizes.json"
    path.write_text("{not json")
    cache = BatchSizeCache(path)
    assert cache.get("k") is None
    cache.set("k", 16)
    assert json.loads(path.read_text()) == {"k": 16}


# --------------------------------------------------------------------------------- estimate_batch_size

B32 = dict(num_params=151_277_313, image_resolution=224, patch_size=32, vision_width=768, vision_layers=12,
           text_width=512, text_layers=12, seq_len=77)
L14 = dict(num_params=427_616_513, image_resolution=224, patch_size=14, vision_width=1024, vision_layers=24,
           text_width=768, text_layers=12, seq_len=77)
GB = 10**9


def test_estimate_matches_the_documented_formula():
    # per sample: 1.25 * 4 * 12 * [(18*50*768 + 2.5*12*50**2) + (18*77*512 + 2.5*8*77**2)] = 95_664_720 B
    # fixed: 16 * 151_277_313 = 2.42 GB; (0.8 * 16 GB - 2.42 GB) / 95.66 MB = 108.5 -> 64
    assert estimate_batch_size(**B32, precision="fp32", available_bytes=16 * GB) == 64
    # bf16: 3 bytes/activation, +2 B/param -> 71.7 MB/sample, (12.8 - 2.72) GB -> 140.5 -> 128
    assert estimate_batch_size(**B32, precision="bf16", available_bytes=16 * GB) == 128


def test_estimate_is_monotonic_and_bounded():
    sizes = [estimate_batch_size(**B32, precision="fp32", available_bytes=g * GB) for g in (1, 4, 8, 16, 32, 80, 400)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert all(s >= 1 and s <= 1024 and s & (s - 1) == 0 for s in sizes)  # powers of two in [1, 1024]
    assert sizes[0] == 1  # 1 GB cannot even hold B/32's optimizer state: 1, not 0
    assert sizes[-1] == 1024  # clamped
    for gb in (8, 24, 80):  # a bigger model never gets a bigger batch, and at 24 GB a strictly smaller one
        assert estimate_batch_size(**L14, precision="fp32", available_bytes=gb * GB) <= \
            estimate_batch_size(**B32, precision="fp32", available_bytes=gb * GB)
    assert estimate_batch_size(**L14, precision="fp32", available_bytes=24 * GB) < \
        estimate_batch_size(**B32, precision="fp32", available_bytes=24 * GB)
    assert estimate_batch_size(**{**B32, "image_resolution": 336}, precision="fp32", available_bytes=24 * GB) < \
        estimate_batch_size(**B32, precision="fp32", available_bytes=24 * GB)
    with pytest.raises(ValueError, match="precision"):
        estimate_batch_size(**B32, precision="fp8", available_bytes=GB)


def test_estimate_for_a_model_reads_its_config(tiny):
    model, _ = tiny
    got = estimate_batch_size_for_model(model, image_resolution=32, seq_len=16, precision="fp32", device="cpu",
                                        available_bytes=50_000_000)
    want = estimate_batch_size(sum(p.numel() for p in model.parameters()), 32, 8, 64, 2, 64, 2, 16, "fp32", 50_000_000)
    assert got == want and 1 < got < 1024
    # without available_bytes it asks psutil (CPU): some power of two
    auto = estimate_batch_size_for_model(model, image_resolution=32, seq_len=16, precision="fp32", device="cpu")
    assert 1 <= auto <= 1024 and auto & (auto - 1) == 0


# -------------------------------------------------------------------------------- resolve_batch_size


def _never(*_):
    raise AssertionError("must not be called")


def test_resolve_configured_wins(tmp_path):
    got = resolve_batch_size(requested=24, device_type="cuda", probe=_never, cache=BatchSizeCache(tmp_path / "c.json"),
                             cache_key="k", estimate=_never)
    assert got == (24, "configured")  # (a value below 1 never gets here: validate() refuses trainer.batch_size=0 up front)


def test_resolve_cuda_probes_once_then_uses_the_cache(tmp_path):
    cache = BatchSizeCache(tmp_path / "c.json")
    probe, calls = _fake_probe(37)
    got = resolve_batch_size(requested=None, device_type="cuda", probe=probe, cache=cache, cache_key="m|224|bf16|gpu|",
                             estimate=_never, on_oom=None)
    assert got == (37, "probe") and len(calls) == 9
    assert cache.get("m|224|bf16|gpu|") == 37
    got = resolve_batch_size(requested=None, device_type="cuda", probe=_never, cache=cache, cache_key="m|224|bf16|gpu|",
                             estimate=_never)
    assert got == (37, "cache")


def test_resolve_cuda_without_probe_estimates_or_falls_back():
    assert resolve_batch_size(requested=None, device_type="cuda", probe=None, cache=None, cache_key="k",
                              estimate=lambda: 128) == (128, "estimate")
    assert resolve_batch_size(requested=None, device_type="cuda", probe=None, cache=None, cache_key="k",
                              estimate=None) == (32, "fallback")


def test_resolve_cpu_and_mps_never_probe(tmp_path):
    cache = BatchSizeCache(tmp_path / "c.json")
    cache.set("k", 999)
    for device_type in ("cpu", "mps"):
        assert resolve_batch_size(requested=None, device_type=device_type, probe=_never, cache=cache, cache_key="k",
                                  estimate=lambda: 64) == (64, "estimate")
    assert resolve_batch_size(requested=None, device_type="mps", probe=_never, cache=cache, cache_key="k",
                              estimate=None) == (16, "fallback")
    assert resolve_batch_size(requested=None, device_type="cpu", probe=None, cache=None, cache_key="k",
                              estimate=None) == (8, "fallback")
    assert resolve_batch_size(requested=None, device_type="cpu", probe=None, cache=None, cache_key="k",
                              estimate=None, fallback={"cpu": 4}) == (4, "fallback")
    assert DEFAULT_FALLBACK == {"mps": 16, "cpu": 8, "cuda": 32}


# ------------------------------------------------------------------------------- split + OOMRecovery


def _logical(n: int = 10):
    return {
        "pixel_values": torch.randn(n, 3, 4, 4),
        "input_ids": torch.arange(n * 5).view(n, 5),
        "group_ids": torch.arange(n),
        "captions": [f"caption {i}" for i in range(n)],
        "split": "train",  # metadata: shared, not sliced
    }


def test_split_then_concatenate_gives_the_batch_back():
    batch = _logical(10)
    parts = split_batch(batch, 4)
    assert [p["group_ids"].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for key in ("pixel_values", "input_ids", "group_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    assert sum((p["captions"] for p in parts), []) == batch["captions"]
    assert all(p["split"] == "train" for p in parts)
    assert len(split_batch(batch, 10)) == 1 and len(split_batch(batch, 64)) == 1
    with pytest.raises(ValueError):
        split_batch(batch, 0)
    with pytest.raises(ValueError, match="first dimension"):
        split_batch({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)


def test_micro_batches_halve_and_keep_the_logical_batch():
    rec = MicroBatches(64, 1)
    assert rec.halve() == (32, 2)
    assert rec.halve() == (16, 4)
    assert all(m * a == 64 for m, a in rec.history)
    for _ in range(4):
        rec.halve()
    assert (rec.size, rec.accumulation) == (1, 64)
    with pytest.raises(BatchTooLargeError, match="^out of memory at micro-batch 1 .logical batch 64.; use a smaller model"):
        rec.halve()


def test_micro_batches_with_an_odd_logical_batch_cover_it():
    rec = MicroBatches(12, 2, logical_batch=24)
    seq = [rec.halve() for _ in range(4)]
    assert seq == [(6, 4), (3, 8), (2, 12), (1, 24)]
    rec = MicroBatches(6, 2)  # logical 12
    assert [rec.halve() for _ in range(3)] == [(3, 4), (2, 6), (1, 12)]
    assert all(m * a >= 12 for m, a in rec.history)
    assert len(split_batch(_logical(12), 2)) == 6  # ceil pieces == accum
    assert rec.state_dict() == {"micro": 1, "accum": 12, "logical_batch": 12}


def test_attempt_catches_out_of_memory_only():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert attempt(oom) == (False, None)
    assert attempt(lambda x: x + 1, 1) == (True, 2)
    with pytest.raises(KeyError):
        attempt(lambda: {}["not memory"])
