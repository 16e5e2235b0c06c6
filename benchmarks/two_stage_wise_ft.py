"""Two-stage fine-tuning with WiSE-FT, offline: prints the alpha vs target / retention table.

    python benchmarks/two_stage_wise_ft.py                      # shapes data + both stages under /tmp, the table
    python benchmarks/two_stage_wise_ft.py --out runs/two_stage --steps1 100 --steps2 300

Stage 1 stands in for a "general" model: the tiny CLIP trained from random weights on a generated set of
coloured shapes (class sub-folders, ``domain=general`` prompts). Stage 2 fine-tunes stage 1's run folder
on the textile inspection images (``domain=industrial``) with the shapes set as ``eval_data`` (the
retention set: what stage 2 forgets) and WiSE-FT over ``alpha = 0, 0.25, 0.5, 0.75, 1``. Both stages are
``python -m clipexp`` commands, printed before they run; any extra arguments go to both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ("red circle", "green square", "blue triangle")


def make_shapes(root: Path, per_class: int = 200, size: int = 64, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: one shape per image, random size, place, shade and grey background noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200)}
    for name in SHAPES:
        colour, shape = name.split()
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            grey = int(rng.integers(60, 200))
            pixels = np.clip(grey + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            r = int(rng.integers(size // 8, size // 3))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            fill = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colours[colour])
            if shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif shape == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            image.save(folder / f"{i:04d}.png")
    return root


def clipexp(args, run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "clipexp", *args, f"hydra.run.dir={run_dir}"]
    print("$ python -m clipexp " + " ".join(args + [f"hydra.run.dir={run_dir}"]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"stage failed ({res.returncode}):\n{res.stderr[-3000:]}")
    print(res.stdout, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/clipexp_two_stage"))
    p.add_argument("--steps1", type=int, default=60)   # the shapes are learnt (val accuracy 1.0) by step 50
    p.add_argument("--steps2", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    args, extra = p.parse_known_args()
    shapes = args.out / "shapes"
    if not shapes.is_dir():
        make_shapes(shapes)
    common = ["model=tiny", "device=cpu", "tracking.enabled=false", "trainer.batch_size=64", "trainer.learning_rate=1e-3",
              "trainer.warmup_steps=30", "trainer.weight_decay=0.05", "trainer.logging_steps=50", "trainer.eval_steps=50",
              "trainer.save_steps=100", "trainer.progress=false", "trainer.monitor=val/zeroshot_balanced_acc", f"seed={args.seed}",
              "data.augment_text=true", *extra]
    stage1, stage2 = args.out / "stage1", args.out / "stage2"
    clipexp([*common, "domain=general", "data=folder", f"data.path={shapes}", f"trainer.max_steps={args.steps1}"], stage1)
    clipexp([*common, "domain=industrial", "data=textile", f"model.name_or_path={stage1}", f"trainer.max_steps={args.steps2}",
             "eval_data=folder", f"eval_data.path={shapes}", "eval_data.name=shapes", 'eval_data.prompt_templates=["a photo of {}."]',
             "trainer.wise_ft.alphas=[0,0.25,0.5,0.75,1]"], stage2)
    result = json.loads((stage2 / "metrics.json").read_text())["wise_ft"]
    print("| alpha | textile val balanced acc | shapes (retention) val balanced acc |\n|---|---|---|")
    for key, m in result["alphas"].items():
        sel = " (selected)" if float(key.split("_")[1]) == result["selected"] else ""
        print(f"| {key.split('_')[1]}{sel} | {m['val/zeroshot_balanced_acc']:.4f} | {m['shapes/zeroshot_balanced_acc']:.4f} |")


if __name__ == "__main__":
    main()
