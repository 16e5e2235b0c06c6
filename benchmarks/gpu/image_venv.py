"""A throwaway virtual environment that holds only what the device image holds, to try ``make gpu-check`` here.

    python benchmarks/gpu/image_venv.py /tmp/gpu-image-venv      # then:
    make gpu-check PYTHON=/tmp/gpu-image-venv/bin/python GPU_SITE=/tmp/gpu-image-site

The new venv sees, through a ``.pth`` file, links to those distributions of the running interpreter's
environment whose names are in ``image-packages.txt`` (the device image's list), and nothing else: hydra-core,
omegaconf, open-clip-torch, conformal-clip-data, mlflow... are absent, as there. Versions are this machine's
(torch 2.14 here, 2.11 there), so it proves which packages must travel, not that the image's versions work.
It then checks, offline, that ``.gpu-wheels`` completes the image: ``pip install --dry-run --no-index`` of the
wheels with dependency resolution.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set:
    lines = (HERE / "image-packages.txt").read_text().splitlines()
    return {normalize(ln.strip()) for ln in lines if ln.strip() and not ln.startswith("#")}


def image_closure(dists: dict) -> tuple:
    """The image's distributions found here, plus what they require here (this machine's versions may need
    packages the image's versions do not, e.g. huggingface-hub 2's httpx2): (names, the added ones)."""
    from packaging.requirements import Requirement

    names = {n for n in image_packages() if n in dists}
    todo, added = list(names), set()
    while todo:
        for spec in dists[todo.pop()].requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = normalize(req.name)
            if dep in dists and dep not in names:
                names.add(dep)
                added.add(dep)
                todo.append(dep)
    return names, added


def link_image_distributions(site: Path) -> tuple:
    """Link every top-level entry of the image's distributions (and their requirements) found here into ``site``."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    dists = {normalize(d.metadata["Name"] or ""): d for d in metadata.distributions(path=[str(purelib)])}
    names, added = image_closure(dists)
    site.mkdir(parents=True, exist_ok=True)
    for name in names:
        for top in {Path(str(f)).parts[0] for f in dists[name].files or [] if not str(f).startswith("..")}:
            src, dst = purelib / top, site / top
            if src.exists() and not dst.exists() and top != "__pycache__":
                dst.symlink_to(src)
    return sorted(names), sorted(added)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("venv", type=Path)
    p.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    args = p.parse_args()
    venv = args.venv.resolve()
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)  # pip: the image's, linked
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    image_site = venv.parent / f"{venv.name}-image"
    linked, added = link_image_distributions(image_site)
    (venv_site / "device_image.pth").write_text(f"{image_site}\n")
    print(f"{venv}: {len(linked)} distributions linked from {sysconfig.get_paths()['purelib']}: the image's, and what "
          f"this machine's versions of them require besides ({', '.join(added) or 'nothing'})")
    probe = "import importlib.util as u; print(' '.join(m for m in ('torch','transformers','hydra','omegaconf','open_clip','mlflow','conformal_clip_data') if u.find_spec(m)))"
    print("importable there:", subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.strip())
    wheels = sorted(str(w) for w in args.wheels.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {args.wheels}: run make gpu-wheels", file=sys.stderr)
        return 1
    offline = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # no index and no find-links but the wheels (as there)
    dry = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(args.wheels), *wheels],
                         capture_output=True, text=True, env=offline)
    print(dry.stdout.strip().splitlines()[-1] if dry.returncode == 0 else dry.stderr.strip())
    return dry.returncode


if __name__ == "__main__":
    sys.exit(main())
