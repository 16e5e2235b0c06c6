"""Wall time of :func:`clipexp.heads.evaluate_heads` on a run's real embeddings (the quick start's 1,600 / 200 / 200).

    python -m clipexp experiment=quickstart tracking=none              # a run to take the model from
    OMP_NUM_THREADS=1 python benchmarks/heads_cost.py --model outputs/<date>/<time>/model
    OMP_NUM_THREADS=1 python benchmarks/heads_cost.py --embeddings heads_embeddings.pt   # again, without re-embedding

The textile set is split as the run splits it (``clipexp.data.split.split_pairs``, seed ``--seed``, 0.8 / 0.1
/ 0.1), every image embedded with the run's own preprocessing (``CLIPInference``), the class embeddings and
logit scale taken from the run (``clipexp_inference.json``). The embeddings are saved to ``--embeddings`` on
the first call. Then ``evaluate_heads`` runs ``--repeats`` times with every head and, separately, each head
alone, without and with the k-shot protocol (``--shots`` x ``--draws``), on one torch thread; the median
seconds are printed as a markdown table, with the machine's CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def embed(model_dir: Path, seed: int) -> dict:
    from clipexp.data.split import split_pairs
    from clipexp.data.textile import read_textile
    from clipexp.serving.inference import CLIPInference

    inference = CLIPInference.from_pretrained(model_dir, device="cpu")
    names = list(inference.spec.class_names)
    pairs, _ = read_textile(check_images=False)
    out = {"class_names": names, "text": inference.class_embeddings(), "scale": 1.0 / inference.spec.temperature}
    for split, part in zip(("train", "val", "test"), split_pairs(pairs, 0.8, 0.1, 0.1, seed)):
        emb, errors = inference.embed_sources([p.image_path for p in part])
        assert not any(errors), [e for e in errors if e][:3]
        out[split] = (emb, torch.tensor([names.index(p.label) for p in part]))
    return out


def cpu_name() -> str:
    try:
        line = [x for x in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if "Model name" in x]
        return line[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a run's model/ folder (needed when --embeddings does not exist yet)")
    parser.add_argument("--embeddings", type=Path, default=Path("heads_embeddings.pt"))
    parser.add_argument("--seed", type=int, default=42, help="the run's seed (the split)")
    parser.add_argument("--shots", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    from clipexp.heads import DEFAULT_HEADS, evaluate_heads

    if args.embeddings.is_file():
        data = torch.load(args.embeddings, weights_only=True)
    else:
        if args.model is None:
            parser.error(f"{args.embeddings} does not exist: give --model <run>/model to embed the textile images")
        data = embed(args.model, args.seed)
        torch.save(data, args.embeddings)
    sizes = "/".join(str(len(data[s][1])) for s in ("train", "val", "test"))

    def timed(heads, shots):
        runs, report = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            report = evaluate_heads(data["train"], data["val"], data["test"], data["class_names"], data["text"], data["scale"],
                                    heads=heads, shots=shots, draws=args.draws, seed=0)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs), report

    print(f"{cpu_name()}, 1 torch thread; {sizes} embeddings of dimension {data['train'][0].shape[1]}; "
          f"shots {args.shots} x {args.draws} draws; median of {args.repeats}")
    print("\n| heads | without k-shot (s) | with k-shot (s) | test balanced acc | test ECE (calibrated) | coverage / set size |")
    print("|---|---|---|---|---|---|")
    for heads in [[h] for h in DEFAULT_HEADS] + [list(DEFAULT_HEADS)]:
        plain, _ = timed(heads, [])
        full, report = timed(heads, args.shots)
        m = report.metrics
        first = heads[0] if len(heads) == 1 else None
        figures = ("| |" if first is None else
                   f"| {m[f'test/{first}/balanced_acc']:.3f} | {m[f'test/{first}/ece']:.3f} | "
                   f"{m[f'test/{first}/coverage']:.3f} / {m[f'test/{first}/set_size']:.2f} |")
        print(f"| {'all' if first is None else first} | {plain:.2f} | {full:.2f} {figures}")


if __name__ == "__main__":
    main()
