"""Faults in the middle of a real run, through the CLI as a user meets them, each judged against one uninterrupted run.

The run (``RUN``): the tiny CLIP on 96 textile images, 40 steps of 8 (9 steps an epoch), evaluated and saved every
10 steps, with LoRA adapters whose dropout draws its masks from torch's global generator, so a resume that does not
put the random state back where it was (or feeds the wrong batch) ends with other numbers. Each fault comes from
``tests/fault_hook/sitecustomize.py`` in the run's process: a real signal sent during a chosen optimizer step, or a
real refused write (``RLIMIT_FSIZE``) during a chosen checkpoint. The run is then continued with the command the
run itself printed, and its ``metrics.json`` must be byte for byte the uninterrupted run's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test is one to three short runs in subprocesses (a minute or two here)

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "tests" / "fault_hook"
RUN = ["experiment=smoke", "trainer.max_steps=40", "trainer.save_steps=10", "trainer.eval_steps=10", "trainer.keep_last=10",
       "model.lora.r=4", "model.lora.dropout=0.1", "data.augment_text=true", "tracking.experiment=midrun"]
INTERRUPTED = re.compile(r"^clipexp: interrupted at step (\d+); checkpoint: (\S+); continue with `(clipexp train [^`]+)`$")


def clipexp(args, cwd: Path, **fault: str) -> subprocess.CompletedProcess:
    """``python -m clipexp <args>`` in ``cwd``; ``fault``: the hook's variables (signal=..., disk_full=...)."""
    env = {k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")  # the reference and every resume: the same float sums
    env["PYTHONPATH"] = os.pathsep.join([str(HOOK), str(ROOT)] if fault else [str(ROOT)])
    env.update({f"CLIPEXP_TEST_{k.upper()}": v for k, v in fault.items()})
    return subprocess.run([sys.executable, "-m", "clipexp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def the_printed_command(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the ``clipexp train ...`` command a run printed, exactly as printed (``python -m clipexp`` for ``clipexp``)."""
    words = shlex.split(line)
    assert words[:2] == ["clipexp", "train"], line
    return clipexp(words[1:], cwd)


def start(where: Path) -> list:
    return [*RUN, f"tracking.uri=sqlite:///{where / 'mlflow.db'}", f"hydra.run.dir={where / 'run'}"]


def only_run(where: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("midrun").experiment_id])
    assert len(runs) == 1, [r.info.status for r in runs]  # a resume continues the run, never starts another
    return client, runs[0]


def train_losses(where: Path):
    client, run = only_run(where)
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The run's one error line: the last of stderr, the only ``clipexp: error`` line, and no traceback anywhere."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("clipexp: error")]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr[-3000:]
    return errors[0]


def no_temp_files(run_dir: Path) -> None:
    left = [p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp" in p.name or p.name.startswith(".")]
    assert left == [], left


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: its metrics.json and its MLflow train/loss history are what every continued run must give."""
    where = tmp_path_factory.mktemp("reference")
    res = clipexp(start(where), where)
    assert res.returncode == 0, res.stderr[-3000:]
    assert only_run(where)[1].info.status == "FINISHED"
    return where


def results_bytes(run: Path) -> bytes:
    """metrics.json as written, less its ``mlflow`` section (the run's own id, page and store: another run's differ)."""
    text = (run / "metrics.json").read_text()
    assert '"mlflow": {' in text
    return text[: text.index('"mlflow": {')].encode()  # the results come first; the run's address is the last section


def assert_same_as(reference: Path, where: Path) -> None:
    assert results_bytes(where / "run") == results_bytes(reference / "run")
    # every step's loss as the uninterrupted run logged it (the steps after a periodic checkpoint that a run resumed
    # from are logged twice, by the run that failed and by the resume: with the same value)
    assert set(train_losses(where)) == set(train_losses(reference))
    _, run = only_run(where)
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("signal_name,step", [("SIGINT", 13), ("SIGTERM", 27)], ids=["sigint-mid-epoch", "sigterm-at-epoch-end"])
def test_interrupted_run_continued_with_the_printed_command_ends_as_the_uninterrupted_one(signal_name, step, reference, tmp_path):
    """Ctrl-C (SIGINT) during step 13, half-way through the second epoch, or SIGTERM during step 27, the last of the
    third: the step in hand is finished and saved, the run stops with exit code 130 and one line naming the step, the
    checkpoint and the command that continues it; that command alone (no override repeated) ends the run as if it had
    never stopped."""
    res = clipexp(start(tmp_path), tmp_path, signal=f"{signal_name}@{step}")
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    found = INTERRUPTED.match(line)
    assert found, line
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step:07d}.pt"
    assert int(found.group(1)) == step and found.group(2) == str(checkpoint)
    from clipexp.training.checkpoint import load_checkpoint

    assert load_checkpoint(checkpoint)["step"] == step
    assert only_run(tmp_path)[1].info.status == "KILLED"
    assert not (tmp_path / "run" / "metrics.json").exists()

    done = the_printed_command(found.group(3), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_as(reference, tmp_path)
    assert only_run(tmp_path)[1].data.tags["resumed_at_step"] == str(step)


def test_disk_full_while_a_checkpoint_is_written_is_one_line_and_the_named_checkpoint_finishes_the_run(reference, tmp_path):
    """The disk refuses step 30's checkpoint half-way: exit code 1, one line naming the checkpoint that could not be
    written and the intact one before it, no temp file left, the MLflow run FAILED; once there is space, resuming
    from the named checkpoint ends the run as if nothing had happened."""
    res = clipexp(start(tmp_path), tmp_path, disk_full="step_0000030@1:65536")  # the checkpoint is ~160 KB
    assert res.returncode == 1, res.stderr[-3000:]
    line = one_error_line(res)
    ckpts = tmp_path / "run" / "checkpoints"
    assert line.startswith(f"clipexp: error: could not write the checkpoint {ckpts / 'step_0000030.pt'}: "), line
    assert f"the previous checkpoint {ckpts / 'step_0000020.pt'} is intact" in line, line
    named = re.search(r"resume with trainer\.resume=(\S+)$", line)
    assert named and named.group(1) == str(ckpts / "step_0000020.pt"), line
    no_temp_files(tmp_path / "run")
    assert not (ckpts / "step_0000030.pt").exists()
    assert only_run(tmp_path)[1].info.status == "FAILED"

    done = clipexp(["train", f"trainer.resume={named.group(1)}"], tmp_path)  # the space is back
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_as(reference, tmp_path)
    assert only_run(tmp_path)[1].data.tags["resumed_at_step"] == "20"


def test_disk_full_while_best_pt_is_rewritten_keeps_the_old_best_pt(tmp_path):
    """best.pt is written at the baseline (step 0) and again at step 10, when the monitored metric improves; the disk
    refuses the second write half-way. The best.pt of step 0 must still be there, whole: a writer that rewrote it
    in place would leave a truncated file, the only best checkpoint lost."""
    res = clipexp(start(tmp_path), tmp_path, disk_full="best.pt@2:4096")  # best.pt is ~45 KB
    assert res.returncode == 1, res.stderr[-3000:]
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert one_error_line(res).startswith(f"clipexp: error: could not write the checkpoint {best}: ")
    from clipexp.training.checkpoint import load_checkpoint

    state = load_checkpoint(best)  # checked against its sha256 manifest first, then torch.load(weights_only=True)
    assert state["step"] == 0 and state["monitor"] == "val/t2i_R1"
    no_temp_files(tmp_path / "run")
    assert only_run(tmp_path)[1].info.status == "FAILED"


def test_resume_replays_the_runs_overrides_may_train_longer_and_refuses_other_changes(tmp_path):
    """``clipexp train trainer.resume=<run>`` composes the run's own command line (experiment=smoke and the rest; the
    default model would need the hub), so a finished run can go on: trainer.max_steps may grow (the change is
    logged on the MLflow run); a change to what the finished steps computed is refused in one line naming the key."""
    first = clipexp(["experiment=smoke", "data.augment_text=true", "tracking.experiment=midrun",  # 4 steps, saved every 2
                     f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    before = (run_dir / "metrics.json").read_bytes()

    refused = clipexp(["train", f"trainer.resume={run_dir}", "trainer.learning_rate=0.5"], tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = one_error_line(refused)
    assert "trainer.learning_rate: 0.001 -> 0.5" in line and "trainer.resume_allow_changes=[trainer.learning_rate]" in line, line
    assert "trainer.max_steps" not in line and (run_dir / "metrics.json").read_bytes() == before

    longer = clipexp(["train", f"trainer.resume={run_dir}", "trainer.max_steps=6"], tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "4"
    assert run.data.tags["resume_changes"] == "trainer.max_steps: 4 -> 6"
    assert [step for step, _ in train_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    import json

    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6
