"""What MLflow's system metrics (``tracking.system_metrics=true``) cost a training step.

    OMP_NUM_THREADS=1 python benchmarks/system_metrics_cost.py                 # the sampling cost alone
    OMP_NUM_THREADS=1 python benchmarks/system_metrics_cost.py --ab 3 --steps 150   # and the quick start with / without

MLflow's ``SystemMetricsMonitor`` is a thread that, every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds
(10 by default), reads CPU, memory, disk and network counters (GPU too with pynvml), reads the run back from
the store (to stop when it ends) and writes one batch of ``system/...`` metrics. Two measurements:

(1) one sampling round, timed on a real SQLite store (the store of a run that is RUNNING), ``--rounds`` times:
    wall and CPU milliseconds per round. Per step it costs ``round / (steps per interval)``.
(2) ``--ab N``: the quick start (``experiment=quickstart trainer.max_steps=--steps``, no evaluation before the
    last step) N times with system metrics and N times without, interleaved, each in its own process; the
    median of the run's own ``train/samples_per_s`` over its logged steps, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sampling_round_ms(rounds: int) -> tuple:
    """Median (wall ms, CPU ms) of one monitor round: collect, read the run back, aggregate, publish, flush."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("bench"))
        monitor = SystemMetricsMonitor(run.info.run_id, tracking_uri=uri)
        walls, cpus = [], []
        for _ in range(rounds + 1):
            w, c = time.perf_counter(), time.thread_time()
            monitor.collect_metrics()
            client.get_run(run.info.run_id)
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
            walls.append((time.perf_counter() - w) * 1000)
            cpus.append((time.thread_time() - c) * 1000)
            time.sleep(0.2)  # psutil's CPU percentages need time between reads
        return statistics.median(walls[1:]), statistics.median(cpus[1:])


def quickstart_samples_per_s(system_metrics: bool, steps: int) -> float:
    """Median ``train/samples_per_s`` of one quick start run (own process, own store)."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        args = ["experiment=quickstart", f"trainer.max_steps={steps}", f"trainer.eval_steps={steps}", f"trainer.save_steps={steps}",
                "trainer.progress=false", "tracking.pyfunc_model=false", f"tracking.system_metrics={str(system_metrics).lower()}"]
        res = subprocess.run([sys.executable, "-m", "clipexp", *args], cwd=tmp, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
        return statistics.median(m.value for m in client.get_metric_history(run.info.run_id, "train/samples_per_s"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--ab", type=int, default=0, help="quick start runs with and without system metrics (each)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--interval", type=float, default=10.0, help="MLflow's sampling interval, s (its default: 10)")
    args = p.parse_args()

    wall, cpu = sampling_round_ms(args.rounds)
    print(f"one sampling round: {wall:.1f} ms wall, {cpu:.1f} ms CPU (median of {args.rounds}); "
          f"every {args.interval:g} s: {cpu / (args.interval * 1000) * 100:.3f}% of one core")
    if args.ab:
        on, off = [], []
        for _ in range(args.ab):
            off.append(quickstart_samples_per_s(False, args.steps))
            on.append(quickstart_samples_per_s(True, args.steps))
        med_on, med_off = statistics.median(on), statistics.median(off)
        step_ms = 64 / med_off * 1000  # the quick start's batch: 64
        print(f"quick start, {args.steps} steps: samples/s without {med_off:.0f} ({', '.join(f'{v:.0f}' for v in off)}), "
              f"with {med_on:.0f} ({', '.join(f'{v:.0f}' for v in on)}); with/without {med_on / med_off:.3f}")
        print(f"a step takes {step_ms:.0f} ms; one round every {args.interval:g} s is {args.interval * 1000 / step_ms:.0f} steps: "
              f"{cpu / (args.interval * 1000 / step_ms):.3f} ms of CPU per step ({cpu / (args.interval * 1000 / step_ms) / step_ms * 100:.3f}%)")


if __name__ == "__main__":
    main()
