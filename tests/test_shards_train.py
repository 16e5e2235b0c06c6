"""data=webdataset through the trainer, on shards the tests write with ``clipexp shards``:

* ``test_shards_give_the_csv_sources_metrics``: the textile smoke run (96 images, seed 42) from its shards
  gives exactly the metrics of the same run from the textile source itself: the same split, the same
  order (``data.shuffle=false`` on both: the sampler's order is the shards' order), the same augmentation
  seeds, 12 steps across an epoch boundary. (With shuffling on, the orders differ by design, so the
  numbers are not compared there.)
* ``test_sigkill_and_resume_continue_the_stream_step_exactly``: 2 loader workers, shuffled shards and
  buffer; killed with SIGKILL once step 9's checkpoint exists (mid-epoch, an odd batch), resumed with
  ``trainer.resume=latest``: the final, best and test metrics equal the uninterrupted run's.
* ``test_too_many_bad_samples_stop_the_run_with_one_line``: a truncated shard over data.max_bad_fraction.
* ``test_two_gloo_ranks_x_two_workers_see_every_sample_once_per_epoch``: torchrun, 2 CPU ranks, each
  with 2 loader workers, two epochs of the trainer's own batches (``Trainer._logical_batches``).

Run as ``python -m torch.distributed.run --nproc_per_node=2 -m test_shards_train OUT SHARDS`` (tests/ on
PYTHONPATH) each rank runs :func:`_rank_main`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from processes import wait_for

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SMOKE = ["experiment=smoke", "device=cpu", "tracking.enabled=false", "data.max_samples=96"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _popen(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "clipexp", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(args, cwd, timeout=600):
    proc = _popen(args, cwd)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def textile_shards(tmp_path_factory) -> Path:
    """The smoke run's 96 textile images (data.max_samples=96, seed 42) as shards of 10: train 77, val 10, test 9."""
    out = tmp_path_factory.mktemp("textile") / "shards"
    res = subprocess.run([sys.executable, "-m", "clipexp", "shards", "textile", str(out), "--max-samples", "96",
                          "--shard-size", "10"], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train: 77 samples in 8 shards" in res.stdout
    return out


def _shard_args(d: Path):
    return ["data=webdataset", f"data.urls='{d / 'train-{000000..000007}.tar'}'", f"data.val_urls={d / 'val-000000.tar'}",
            f"data.test_urls={d / 'test-000000.tar'}"]


def _metrics(run: Path):
    return json.loads((run / "metrics.json").read_text())


def test_shards_give_the_csv_sources_metrics(tmp_path, textile_shards):
    same = [*SMOKE, "data.shuffle=false", "data.num_workers=0", "trainer.max_steps=12", "trainer.eval_steps=6"]
    src = _popen([*same, f"hydra.run.dir={tmp_path / 'src'}"], tmp_path)
    code, out, err = _run([*same, *_shard_args(textile_shards), f"hydra.run.dir={tmp_path / 'shards'}"], tmp_path)
    assert code == 0, err[-3000:]
    src_out, src_err = src.communicate(timeout=600)
    assert src.returncode == 0, src_err[-3000:]
    a, b = _metrics(tmp_path / "src"), _metrics(tmp_path / "shards")
    assert a["steps"] == b["steps"] == 12
    for section in ("baseline", "final", "best", "test"):
        assert b[section] == a[section], section
    assert "train 77 / val 10 / test 9 pairs; 12 steps (9 per epoch, 1.33 epochs)" in out + err


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_sigkill_and_resume_continue_the_stream_step_exactly(tmp_path, textile_shards):
    # 2 workers: 4 shards each, the smallest 4 hold 37 samples -> 4 batches of 8 per worker, 8 steps per epoch
    args = [*SMOKE, *_shard_args(textile_shards), "data.num_workers=2", "data.shuffle_buffer=16", "trainer.max_steps=20",
            "trainer.save_steps=3", "trainer.eval_steps=10", "trainer.keep_last=10"]
    ref = _popen([*args, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    run = [*args, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = _popen(run, tmp_path)
    wait_for(tmp_path / "run" / "checkpoints" / "step_0000009.pt", proc)  # epoch 1, after its first batch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "metrics.json").exists()
    code, out, err = _run([*run, "trainer.resume=latest"], tmp_path)
    assert code == 0, err[-3000:]
    assert "resumed from" in out + err and "(epoch 1, batch 1)" in out + err
    ref_out, ref_err = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_err[-3000:]
    assert "20 steps (8 per epoch, 2.5 epochs)" in ref_out + ref_err
    a, b = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    assert a["steps"] == b["steps"] == 20
    for section in ("final", "best", "test"):
        assert b[section] == a[section], section


def test_too_many_bad_samples_stop_the_run_with_one_line(tmp_path, textile_shards):
    d = tmp_path / "bad"
    d.mkdir()
    for p in textile_shards.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    shard = d / "train-000002.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[3 * 3].offset_data + 20  # inside sample 3's image: 3 read, 7 lost
    shard.write_bytes(shard.read_bytes()[:cut])
    code, out, err = _run([*SMOKE, *_shard_args(d), "data.num_workers=2", "data.max_bad_fraction=0.05", "trainer.max_steps=20",
                           f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("clipexp: error: 7 bad samples of ") and "exceed data.max_bad_fraction=0.05" in last, last
    assert "train-000002.tar: 7 of the manifest's 10 samples missing" in last
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# 2 Gloo ranks x 2 loader workers
# --------------------------------------------------------------------------------------------------


def _rank_main(out: Path, shards: Path) -> None:
    import torch.distributed as dist

    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import Trainer

    cfg = compose_and_validate(["experiment=smoke", "device=cpu", "tracking.enabled=false", "data=webdataset",
                                f"data.urls='{shards / 'train-{000000..000007}.tar'}'", "data.num_workers=2", "data.shuffle_buffer=8",
                                "trainer.batch_size=5", "trainer.max_steps=100", "trainer.dist_timeout_s=120"])
    trainer = Trainer(cfg, out / "run").setup()
    batches, seen = trainer._logical_batches(), []
    for _ in range(2 * trainer.plan.steps_per_epoch):
        batch = next(batches)
        seen.append([trainer.epoch, batch["indices"].tolist()])
        trainer.batch_in_epoch += 1  # what the loop does after each step: the position moves with the step
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"steps_per_epoch": trainer.plan.steps_per_epoch, "seen": seen})
    if dist.get_rank() == 0:
        (out / "seen.json").write_text(json.dumps(everyone))
    trainer.cleanup()



@pytest.mark.parametrize("cut", ["000001", "000002"])
def test_a_bad_shard_read_before_enough_samples_is_judged_at_the_end_of_the_pass(tmp_path, textile_shards, cut):
    # two train shards of 10, one cut after 3 samples: 20 samples, 7 of them bad, batches of 13 (one a pass, so the
    # 13 good ones fill it and nothing is read twice). Read first, the cut shard is met at 10 samples, under the
    # 1 / 0.05 = 20 the share is judged from while reading: only the end of the pass stops the run at its first 7
    # (read second, it is met at 20). Either order is one of the two cases.
    d = tmp_path / "bad"
    d.mkdir()
    for p in textile_shards.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    shard = d / f"train-{cut}.tar"
    with tarfile.open(shard) as tar:
        cut_at = tar.getmembers()[3 * 3].offset_data + 20
    shard.write_bytes(shard.read_bytes()[:cut_at])
    code, out, err = _run([*SMOKE, "data=webdataset", f"data.urls='{d / 'train-{000001..000002}.tar'}'", f"data.val_urls={d / 'val-000000.tar'}",
                           f"data.test_urls={d / 'test-000000.tar'}", "data.num_workers=0", "data.max_bad_fraction=0.05",
                           "trainer.batch_size=13", "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("clipexp: error: 7 bad samples of 20 read") and "exceed data.max_bad_fraction=0.05" in last, last

@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_two_gloo_ranks_x_two_workers_see_every_sample_once_per_epoch(tmp_path):
    from shards_helpers import N, write_csv  # the 80 generated pairs

    src = tmp_path / "src"
    res = subprocess.run([sys.executable, "-m", "clipexp", "shards", str(write_csv(src)), str(src / "shards"), "--split", "1,0,0",
                          "--shard-size", "10"], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "test_shards_train",
                          str(tmp_path), str(src / "shards")], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    ranks = json.loads((tmp_path / "seen.json").read_text())
    assert [r["steps_per_epoch"] for r in ranks] == [8, 8]  # 4 streams x 2 shards x 10 samples / batch 5, per rank 2 workers x 4
    orders = []
    for epoch in (0, 1):
        per_rank = [[i for e, ids in r["seen"] if e == epoch for i in ids] for r in ranks]
        assert all(len(ids) == 40 for ids in per_rank)
        assert not set(per_rank[0]) & set(per_rank[1])  # the ranks read different shards
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N))  # every sample once in the epoch
        orders.append(per_rank)
    assert orders[0] != orders[1]


if __name__ == "__main__":  # a rank of test_two_gloo_ranks_x_two_workers_see_every_sample_once_per_epoch
    _rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
