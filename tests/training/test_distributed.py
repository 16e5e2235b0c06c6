"""torchrun / DDP: two CPU processes (Gloo) against one process on the concatenated global batch.

* ``test_two_ranks_match_one_process_on_the_global_batch``: the trainer's own step (``Trainer.step``)
  on 2 ranks x 4 samples gives the loss and the parameter gradients of one process on the 8 samples
  (contrastive, multi-positive with the model's logit scale, SigLIP with its learnable temperature and
  bias, exact accumulation); sharded evaluation gives the single-process numbers; a collective that a
  rank never joins times out with an error the trainer recognises.
* ``test_torchrun_smoke_end_to_end``: ``torchrun --nproc_per_node=2 -m clipexp experiment=smoke``:
  one output folder, one MLflow run, checkpoints written once (by rank 0); a rank that fails ends the
  job with one line and a FAILED run; ``trainer.resume=latest`` on 2 ranks ends with the uninterrupted
  run's numbers, in the same MLflow run.

Run this file as ``python -m torch.distributed.run --nproc_per_node=2 -m test_distributed OUT_DIR``
(with ``tests/`` on ``PYTHONPATH``) and each rank runs :func:`_rank_main`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from numerics import REORDER, scale_of

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
WORLD, LOCAL = 2, 4  # 2 ranks x 4 samples = a global batch of 8
GROUPS = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5])  # duplicates within rank 0 (0) and across ranks (1)
LABELS = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])
BASE = ["experiment=smoke", "device=cpu", "tracking.enabled=false", "data.num_workers=0", "trainer.eval_batch_size=3",
        "trainer.dist_timeout_s=120"]
CASES: Dict[str, List[str]] = {
    # (a random tiny CLIP's embeddings are all alike: a low temperature keeps the logits apart)
    "contrastive": ["loss=contrastive", "loss.multi_positive=false", "loss.temperature=0.01"],
    "multi_positive": ["loss=contrastive", "loss.multi_positive=true", "loss.temperature=0.01"],
    "model_logit_scale": ["loss=contrastive", "loss.multi_positive=true", "loss.use_model_logit_scale=true"],
    "siglip": ["loss=siglip"],  # learnable temperature and bias: parameters of the loss, outside DDP
    "exact_accumulation": ["loss=contrastive", "loss.multi_positive=true", "loss.learnable_temp=true", "loss.temperature=0.01",
                           "trainer.accumulation=exact", "trainer.gradient_accumulation_steps=2"],
}


# --------------------------------------------------------------------------------------------------
# The pieces both sides run
# --------------------------------------------------------------------------------------------------


def _trainer(case: str, output_dir: Path):
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import Trainer

    return Trainer(compose_and_validate([*BASE, *CASES[case]]), output_dir).setup()


def _global_batch(trainer) -> Dict[str, torch.Tensor]:
    """8 training images of all three classes and 8 different captions; group ids repeat across ranks."""
    batch = trainer.collate([trainer.data.train[i] for i in range(0, 9 * WORLD * LOCAL, 9)])
    captions = [f"textile sample {i}: {'a small local defect' if g % 2 else 'no defect'} on {i + 2} threads." for i, g in enumerate(GROUPS)]
    tok = trainer.processor.tokenizer(captions, padding="max_length", truncation=True, max_length=trainer.cfg.model.max_sequence_length,
                                      return_tensors="pt")
    batch.update(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], group_ids=GROUPS.clone(), labels=LABELS.clone())
    return batch


def _step(trainer, batch, micro: int):
    """One logical batch through the trainer's own step (micro-batches of ``micro``); returns the loss and every gradient
    the optimizer steps with (after the ranks' averaging and the clipping: read in the optimizer's pre-step hook)."""
    grads = {}

    def grab(optimizer, args, kwargs):
        grads.update({f"model.{n}": p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        grads.update({f"loss.{n}": p.grad.detach().clone() for n, p in trainer.loss_fn.named_parameters() if p.grad is not None})

    hook = trainer.optimizer.register_step_pre_hook(grab)
    trainer.micro.size = micro
    out = trainer.step(batch)
    hook.remove()
    return {"loss": float(out["loss"]), "grads": grads}


def _rank_main(out_dir: Path) -> None:
    """Each rank: every case on its slice of the global batch, then the sharded evaluation, then a timeout."""
    import datetime

    import torch.distributed as dist

    from clipexp.training.distributed import is_collective_error

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {}
    for case in CASES:
        trainer = _trainer(case, out_dir / f"run_{rank}")
        assert trainer.dist.world_size == WORLD and trainer.dist.backend == "gloo"
        mine = {k: v[rank * LOCAL:(rank + 1) * LOCAL] for k, v in _global_batch(trainer).items()}
        results[case] = _step(trainer, mine, micro=LOCAL // 2 if "exact" in case else LOCAL)
        results[case]["ddp"] = type(trainer.encoder).__name__
    results["eval"] = trainer.compute_metrics("val")["metrics"]

    # a collective that rank 1 never joins: rank 0 fails after the group's timeout instead of hanging
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    if rank == 0:
        start = time.perf_counter()
        try:
            dist.barrier(group=group)
            results["timeout"] = "no error"
        except Exception as err:  # noqa: BLE001 - what the trainer sees
            results["timeout"] = {"collective": is_collective_error(err), "seconds": time.perf_counter() - start}
    torch.save(results, out_dir / f"rank{rank}.pt")
    if rank == 1:
        time.sleep(4)
    sys.stdout.flush()
    os._exit(0)  # a timed-out gloo group may abort in interpreter teardown


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_epoch_sampler_gives_each_rank_its_slice_of_every_global_batch():
    from clipexp.training.data import EpochSampler

    one = EpochSampler(n=20, batch_size=6, num_batches=3, seed=7)
    ranks = [EpochSampler(n=20, batch_size=3, num_batches=3, seed=7, rank=r, world_size=2) for r in range(2)]
    for epoch, start in ((0, 0), (1, 0), (1, 6)):  # mid-epoch resume: start counts global indices
        one.set_epoch(epoch, start)
        for s in ranks:
            s.set_epoch(epoch, start)
        parts = [list(s) for s in ranks]
        assert all(len(p) == len(s) == (18 - start) // 2 for p, s in zip(parts, ranks))
        merged = [i for step in range(len(parts[0]) // 3) for p in parts for i in p[step * 3:(step + 1) * 3]]
        assert merged == list(one)  # rank 0's 3 then rank 1's 3 = the single process's batch of 6
    with pytest.raises(ValueError, match="multiple of the global batch"):
        ranks[0].set_epoch(0, start=3)


def test_a_multi_task_submitit_job_exports_torchrun_variables(monkeypatch):
    """hydra/launcher=slurm with tasks_per_node > 1: each SLURM task becomes a rank (no cluster needed)."""
    from clipexp.training.distributed import env_world_size

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    slurm = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2",
                 SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_NODEID="1")
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    try:
        assert env_world_size() == 16
        assert {k: os.environ[k] for k in keys[:5]} == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                                                        "MASTER_ADDR": "gpu07"}
    finally:
        for key in keys:
            os.environ.pop(key, None)


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    env = _env(PYTHONPATH=os.pathsep.join(map(str, (ROOT, TESTS, TESTS.parent))))  # this module, and tests/numerics.py
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                             "-m", "test_distributed", str(tmp_path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # meanwhile, the reference: one process, the whole global batch as one micro-batch
    torch.set_num_threads(1)
    want = {}
    for case in CASES:
        trainer = _trainer(case, tmp_path / "single")
        assert trainer.dist.world_size == 1 and type(trainer.encoder).__name__ == "DualEncoder"
        want[case] = _step(trainer, _global_batch(trainer), micro=WORLD * LOCAL)
    want_eval = trainer.compute_metrics("val")["metrics"]

    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for case in CASES:
        assert got[0][case]["ddp"] == ("DualEncoder" if "exact" in case else "DistributedDataParallel"), case
        worst = 0.0
        for rank in range(WORLD):
            g, w = got[rank][case], want[case]
            assert g["loss"] == pytest.approx(w["loss"], rel=REORDER), (case, rank)  # a sum over ranks: close
            assert g["grads"].keys() == w["grads"].keys() and len(w["grads"]) > 10, case
            # float32 sums in another order: every entry within REORDER of the step's largest gradient entry
            scale = scale_of(*w["grads"].values())
            for name, ref in w["grads"].items():
                error = float((g["grads"][name] - ref).abs().max()) / scale
                assert error < REORDER, (case, rank, name, error)
                worst = max(worst, error)
        print(f"{case}: loss {want[case]['loss']:.6f}; largest gradient difference {worst:.1e} of the largest gradient")
    assert "model.logit_scale" in want["model_logit_scale"]["grads"]
    assert {"loss.logit_scale", "loss.logit_bias"} <= set(want["siglip"]["grads"])

    # sharded evaluation (batches of 3 dealt to 2 ranks) = one process; both ranks hold rank 0's numbers
    assert got[0]["eval"] == got[1]["eval"]
    assert got[0]["eval"].keys() == want_eval.keys()
    for name, value in want_eval.items():
        assert got[0]["eval"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name

    timeout = got[0]["timeout"]
    assert timeout != "no error" and timeout["collective"] and 1.5 < timeout["seconds"] < 30, timeout


# --------------------------------------------------------------------------------------------------
# End to end through torchrun
# --------------------------------------------------------------------------------------------------

SMOKE = ["experiment=smoke", "trainer.batch_size=4", "data.num_workers=0", "trainer.dist_timeout_s=120"]

# Runs clipexp's main on each rank, recording every atomic_save with its rank and making one rank fail.
INJECT = '''
import os
import clipexp.training.checkpoint as checkpoint
import clipexp.training.trainer as train

rank = os.environ["RANK"]
_save = checkpoint.atomic_save
def recording_save(obj, path):
    with open(os.environ["SAVES"], "a") as fh:
        fh.write(f"{rank} {path}\\n")
    return _save(obj, path)
checkpoint.atomic_save = recording_save

fail_rank, fail_at = os.environ["FAIL"].split(":")
_forward_backward = train.Trainer._forward_backward
def failing(self, micro_batches):
    if rank == fail_rank and self.global_step == int(fail_at):
        raise RuntimeError(f"injected failure on rank {rank}")
    return _forward_backward(self, micro_batches)
train.Trainer._forward_backward = failing

from clipexp.cli.train import main
main()
'''


def _env(**extra) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}
    env.update({"PYTHONPATH": str(ROOT), **extra})
    return env


def _torchrun(*args, cwd: Path, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args],
                          cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client, client.search_runs([client.get_experiment_by_name("smoke").experiment_id])


@pytest.mark.slow  # torchrun + 2 Gloo ranks + MLflow end to end: 140 s on 1 core; the loss/gradient equality of 2 ranks stays in the default run
def test_torchrun_smoke_end_to_end(tmp_path):
    # 1. uninterrupted: torchrun -m clipexp, default output folder (the ranks must agree on it)
    a = tmp_path / "a"
    a.mkdir()
    start = time.perf_counter()
    res = _torchrun("-m", "clipexp", *SMOKE, f"tracking.uri=sqlite:///{a / 'mlflow.db'}", cwd=a)
    seconds_a = time.perf_counter() - start
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("outputs: ") == 1 and res.stdout.count("mlflow:  ") == 1  # rank 0 prints the summary, once
    assert res.stdout.count("val baseline:") == 1  # and only rank 0 logs
    folders = list((a / "outputs").glob("*/*"))
    assert len(folders) == 1, folders
    run_a = folders[0]
    # mlflow_run.json: the store and run a later replay writes to; test_split.csv: what the batch tools reproduce
    assert sorted(p.name for p in run_a.iterdir()) == [".hydra", "checkpoints", "config.yaml", "metrics.json", "mlflow_journal.jsonl",
                                                        "mlflow_run.json", "model", "plots", "test_split.csv", "train.log"]
    assert sorted(p.name for p in (run_a / "checkpoints").glob("*.pt")) == ["best.pt", "step_0000002.pt", "step_0000004.pt"]
    client, runs = _runs(a / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["derived.world_size"] == "2" and run.data.params["derived.global_batch"] == "8"
    assert run.data.params["derived.batch_size"] == "4"
    steps = lambda name: [m.step for m in client.get_metric_history(run.info.run_id, name)]
    assert steps("train/loss") == [1, 2, 3, 4] and steps("val/t2i_R1") == [0, 2, 4]  # logged once per step
    assert "train/samples_per_s" in run.data.metrics

    # 2. rank 1 fails at step 3 (after the step-2 checkpoint): one line naming it, exit != 0, run FAILED, no hang
    b = tmp_path / "b"
    b.mkdir()
    (b / "inject.py").write_text(INJECT)
    store = f"tracking.uri=sqlite:///{b / 'mlflow.db'}"
    start = time.perf_counter()
    res = _torchrun("inject.py", *SMOKE, store, cwd=b, env=_env(SAVES=str(b / "saves.txt"), FAIL="1:2"))
    seconds_fail = time.perf_counter() - start
    assert res.returncode != 0
    assert "clipexp: error: rank 1 failed at step 3: RuntimeError: injected failure on rank 1" in res.stderr, res.stderr[-4000:]
    _, runs = _runs(b / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    saves = [line.split(" ", 1) for line in (b / "saves.txt").read_text().splitlines()]
    assert {rank for rank, _ in saves} == {"0"}, saves  # only rank 0 writes checkpoints
    assert [Path(p).name for _, p in saves].count("step_0000002.pt") == 1

    # 3. resume on 2 ranks from the latest checkpoint: the uninterrupted run's numbers, the same MLflow run
    (failed,) = (b / "outputs").glob("*/*")
    res = _torchrun("-m", "clipexp", *SMOKE, store, f"trainer.resume={failed}", cwd=b)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed from" in res.stdout + res.stderr
    _, runs = _runs(b / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["resumed_at_step"] == "2"
    resumed = [f for f in (b / "outputs").glob("*/*") if (f / "metrics.json").is_file()]
    assert resumed == [failed]  # the resume continues in the run's own folder
    want = json.loads((run_a / "metrics.json").read_text())
    got = json.loads((resumed[0] / "metrics.json").read_text())
    assert got["steps"] == want["steps"] == 4
    for section in ("final", "test", "best"):
        assert got[section] == want[section], section  # exact: a resume replays the same steps on the same numbers
    print(f"torchrun smoke: {seconds_a:.1f} s; failing run stopped after {seconds_fail:.1f} s")


if __name__ == "__main__":  # a rank of test_two_ranks_match_one_process_on_the_global_batch
    _rank_main(Path(sys.argv[1]))
