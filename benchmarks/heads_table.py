"""The heads' results table over seeds, from the ``metrics.json`` of finished runs (their ``heads`` section).

    for s in 0 1 2; do OMP_NUM_THREADS=1 nice -n 19 python -m clipexp experiment=quickstart seed=$s; done
    python benchmarks/heads_table.py outputs/*/*/metrics.json

Prints, per head, the test balanced accuracy, the ECE before and after temperature scaling, the coverage and the
mean size of the prediction sets (mean +- sample std over the runs, then each run's value in the order given),
the per-class test recall, and the k-shot curve's means: the tables of docs/heads.md and docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List

from omegaconf import OmegaConf

HEADS = ("zero_shot", "prototype", "linear", "knn", "tip")


def spread(values: List[float], digits: int = 3) -> str:
    f = f"{{:.{digits}f}}"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{f.format(statistics.mean(values))} +- {f.format(std)} ({', '.join(f.format(v) for v in values)})"


def table(runs: List[Dict[str, float]], alpha: float) -> str:
    lines = [f"| head | test balanced acc | ECE uncalibrated -> calibrated | coverage at alpha {alpha:g} | set size |",
             "|---|---|---|---|---|"]
    for h in HEADS:
        if f"test/{h}/balanced_acc" not in runs[0]:
            continue
        col = lambda name: [r[f"test/{h}/{name}"] for r in runs]  # noqa: E731
        lines.append(f"| `{h}` | {spread(col('balanced_acc'))} | {statistics.mean(col('ece_uncalibrated')):.3f} -> "
                     f"{spread(col('ece'))} | {spread(col('coverage'))} | {spread(col('set_size'), 2)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json of finished runs (one per seed)")
    args = parser.parse_args()
    summaries = [json.loads(p.read_text()) for p in args.metrics]
    runs = [s["heads"] for s in summaries]
    alphas = {float(OmegaConf.load(p.parent / "config.yaml").eval.conformal.alpha) for p in args.metrics}
    if len(alphas) != 1:
        raise SystemExit(f"the runs used different eval.conformal.alpha: {sorted(alphas)}")
    print(table(runs, alphas.pop()))
    print("\nthe trainer's test zero-shot balanced accuracy:", ", ".join(f"{s['test']['test/zeroshot_balanced_acc']:.3f}" for s in summaries))
    print("\ntest recall (local defect / nominal / global defect), per run:")
    for h in HEADS:
        cells = [" / ".join(f"{r.get(f'test/{h}/recall/{c}', float('nan')):.2f}" for c in ("local_defect", "nominal", "global_defect"))
                 for r in runs]
        print(f"  {h:<10} " + "   ".join(cells))
    print("\nk-shot test balanced accuracy, mean over runs of each run's mean over draws:")
    for h in HEADS[1:]:
        shots = sorted({int(k.split("/")[2][len("shots_"):]) for k in runs[0] if k.startswith(f"test/{h}/shots_")})
        if shots:
            print(f"  {h:<10} " + "  ".join(f"{k}: {statistics.mean(r[f'test/{h}/shots_{k}/balanced_acc_mean'] for r in runs):.3f}"
                                           for k in shots))


if __name__ == "__main__":
    main()
