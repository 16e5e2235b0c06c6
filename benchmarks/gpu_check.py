"""One bounded command for a GPU lent for minutes: the CUDA tests, then the GPU mode of the throughput benchmark.

    make gpu-check                        # installs what is missing from .gpu-wheels/ first (make gpu-wheels)
    python benchmarks/gpu_check.py --budget 480 --summary gpu-check.md

Parts, in order, each in its own process and each bounded by what is left of ``--budget`` (default 480 s):

1. ``tests``: ``tests/training/test_precision_devices.py`` and the other ``gpu`` tests. On CUDA: the ``gpu``
   tests (bf16 steps against the fp32 reference, fp16 + GradScaler with its skips and an exact resume, fused
   AdamW against a float64 AdamW, ``device.compile`` against eager, the device and fused-flag checks). Without
   CUDA: the same file's CPU twins (the same maths and tolerances; the compile twin too), and each GPU test is
   listed as skipped with its reason.
2. ``throughput``: ``benchmarks/throughput.py --model vit-b32-arch --device cuda --precision bf16
   --batch-size 256 --only a,b,d`` (a/b, a/d, MFU, peak memory), 2 repeats when the time left allows, else 1.
   Needs CUDA; skipped with the reason otherwise.

A part that would not fit in the time left is skipped and says so. The summary (Markdown: the machine, each
test's result and time, the benchmark's table) is printed and written to ``--summary``, and to
``$OUT/gpu-check.md`` when ``OUT`` is set. Exit status: 0 when nothing failed (skips included), 1 otherwise.

``--carry-size DIR``: instead, print the size of what a device call carries (the tracked and untracked,
not ignored files of this checkout, plus ``DIR``) and fail above ``--carry-limit-mib`` (default 60 of the 64 MiB).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
TEST_FILE = "tests/training/test_precision_devices.py"
GPU_TESTS = [TEST_FILE, "tests/training/test_levers.py", "tests/test_device.py"]
NEEDED = {"hydra": "hydra-core", "omegaconf": "omegaconf", "open_clip": "open-clip-torch",
          "open_clip_train": "open-clip-torch", "conformal_clip_data": "conformal-clip-data", "ftfy": "ftfy"}
THROUGHPUT = ["--model", "vit-b32-arch", "--device", "cuda", "--precision", "bf16", "--batch-size", "256", "--only", "a,b,d",
              "--steps", "10", "--warmup", "3", "--timeout", "150"]
# least seconds a part needs to be worth starting (process start, imports, CUDA init, data set-up); the benchmark
# repeats each measurement twice when it has TWO_REPEATS seconds, once otherwise (3 processes of ~40-60 s each)
MIN_SECONDS = {"tests": 60, "throughput": 150}
TWO_REPEATS = 330


def missing_packages() -> List[str]:
    import importlib.util

    return sorted({dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None})


def machine() -> Dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    else:
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"no CUDA GPU; CPU {cpu} ({os.cpu_count()} cores)"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = "unknown"
    return info


def junit_results(path: Path) -> List[Dict[str, str]]:
    """``[{"test", "result", "seconds", "detail"}]`` from pytest's JUnit XML (detail: the skip reason or the
    first line of the failure)."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        result, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                result = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                text = (node.get("message") or node.text or "").strip()
                detail = text.splitlines()[0][:300] if text else ""
                break
        rows.append({"test": name, "result": result, "seconds": f"{float(case.get('time', 0)):.1f}", "detail": detail})
    return rows


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_bounded(cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None):
    """``(exit code or "timeout", stdout + stderr)`` of ``cmd``, run in a process group of its own: at the
    timeout the whole group is killed (the benchmark's measuring processes too), not only ``cmd``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out + err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return "timeout", f"{_text(out)}{_text(err)[-2000:]}\nstopped after {timeout:.0f} s"


def run_tests(cuda: bool, timeout: float) -> Dict[str, object]:
    """The GPU tests on CUDA, else the CPU twins of the GPU test file (their GPU halves listed as skipped)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        marks = "gpu" if cuda else "not apple_silicon"  # CPU: the twins, the slow compile one included
        files = GPU_TESTS if cuda else [TEST_FILE]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks, "-rs", f"--junitxml={xml}", *files]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
               "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}
        t0 = time.perf_counter()
        code, out = run_bounded(cmd, timeout, env)
        rows = junit_results(xml) if xml.is_file() else []
    return {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - t0, "exit": code, "rows": rows, "tail": out[-3000:]}


def run_throughput(timeout: float, out_dir: Optional[Path]) -> Dict[str, object]:
    args = [*THROUGHPUT, "--repeats", "2" if timeout >= TWO_REPEATS else "1"]
    with tempfile.TemporaryDirectory() as tmp:
        js = (out_dir or Path(tmp)) / "throughput-gpu.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), *args, "--json", str(js)]
        t0 = time.perf_counter()
        code, out = run_bounded(cmd, timeout)  # on a timeout, what it printed so far: the repeats that finished
        summary = json.loads(js.read_text()) if js.is_file() else None
    return {"command": "python benchmarks/throughput.py " + " ".join(args), "seconds": time.perf_counter() - t0,
            "exit": code, "output": out, "summary": summary}


def markdown(info: Dict[str, str], budget: float, used: float, parts: Dict[str, Dict[str, object]]) -> str:
    lines = ["# clipexp GPU check", "",
             f"{info['date']}, {info['device']}" + (f", driver {info['driver']}" if info.get("driver") else "")
             + f"; torch {info['torch']}" + (f" (CUDA {info['cuda']})" if info.get("cuda") else "")
             + f", Python {info['python']}; commit {info['commit']}; {used:.0f} s of the {budget:.0f} s budget", ""]
    tests = parts["tests"]
    lines += ["## Tests", ""]
    if "skipped" in tests:
        lines += [f"skipped: {tests['skipped']}", ""]
    else:
        lines += [f"`{tests['command']}`: exit {tests['exit']}, {tests['seconds']:.0f} s", "",
                  "| test | result | s | detail |", "|---|---|---|---|"]
        lines += [f"| `{r['test']}` | {r['result']} | {r['seconds']} | {r['detail'].replace('|', '/')} |" for r in tests["rows"]]
        if not tests["rows"] or tests["exit"] not in (0, 5):
            lines += ["", "```text", str(tests["tail"]).strip(), "```"]
        lines.append("")
    bench = parts["throughput"]
    lines += ["## Throughput, GPU mode", ""]
    if "skipped" in bench:
        lines += [f"skipped: {bench['skipped']}", ""]
    else:
        lines += [f"`{bench['command']}`: exit {bench['exit']}, {bench['seconds']:.0f} s", "", "```text",
                  str(bench["output"]).strip()[-6000:], "```", ""]
    return "\n".join(lines)


def carry_size(extra: Path, limit_mib: float) -> int:
    """Bytes a device call carries: this checkout's tracked and untracked-not-ignored files, plus ``extra``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    tree = sum((ROOT / f).stat().st_size for f in listed if f and (ROOT / f).is_file())
    wheels = sum(p.stat().st_size for p in extra.rglob("*") if p.is_file()) if extra.is_dir() else 0
    total = tree + wheels
    print(f"carried: tree {tree / 2**20:.1f} MiB + {extra} {wheels / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
          f"(limit {limit_mib:g} MiB of the device call's 64)")
    if total > limit_mib * 2**20:
        print("too large: carry less (a smaller data package, fewer wheels)", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480: 8 minutes)")
    p.add_argument("--summary", type=Path, default=None, help="also write the Markdown summary here")
    p.add_argument("--carry-size", type=Path, default=None, metavar="DIR", help="only check what a device call would carry")
    p.add_argument("--carry-limit-mib", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.carry_size is not None:
        return carry_size(args.carry_size, args.carry_limit_mib)
    start = time.perf_counter()
    missing = missing_packages()
    if missing:
        print(f"gpu-check: error: missing packages {', '.join(missing)}; on a machine with pip access run make gpu-wheels "
              f"and carry .gpu-wheels/ (make gpu-check installs from it)", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    info = machine()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    parts: Dict[str, Dict[str, object]] = {}

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    print(f"gpu-check: {info['device']}; budget {args.budget:.0f} s", flush=True)
    if left() < MIN_SECONDS["tests"]:
        parts["tests"] = {"skipped": f"{left():.0f} s left of the budget; the tests need at least {MIN_SECONDS['tests']} s"}
    else:
        bench_reserve = MIN_SECONDS["throughput"] + 30 if cuda else 0
        parts["tests"] = run_tests(cuda, max(MIN_SECONDS["tests"], left() - bench_reserve))
        counts = {}
        for r in parts["tests"]["rows"]:
            counts[r["result"]] = counts.get(r["result"], 0) + 1
        print(f"tests ({'CUDA' if cuda else 'CPU twins; GPU halves skipped'}): {counts or parts['tests']['exit']} "
              f"in {parts['tests']['seconds']:.0f} s", flush=True)
        for r in parts["tests"]["rows"]:
            if r["result"] != "passed":
                print(f"  {r['result']}: {r['test']}: {r['detail']}")
    if not cuda:
        parts["throughput"] = {"skipped": "needs a CUDA GPU (torch.cuda.is_available() is False here)"}
    elif left() < MIN_SECONDS["throughput"]:
        parts["throughput"] = {"skipped": f"{left():.0f} s left of the budget; the GPU benchmark needs at least {MIN_SECONDS['throughput']} s"}
    else:
        parts["throughput"] = run_throughput(left() - 10, out_dir)
        print(parts["throughput"]["output"][-4000:], flush=True)
    print(f"throughput: {parts['throughput'].get('skipped') or 'exit ' + str(parts['throughput']['exit'])}")

    text = markdown(info, args.budget, time.perf_counter() - start, parts)
    for dest in filter(None, [args.summary, out_dir / "gpu-check.md" if out_dir else None]):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        print(f"summary: {dest}")
    failed = [r for r in parts["tests"].get("rows", []) if r["result"] in ("FAILED", "ERROR")]
    bad_exit = "skipped" not in parts["tests"] and parts["tests"]["exit"] not in (0, 5)
    bench_bad = "skipped" not in parts["throughput"] and parts["throughput"]["exit"] != 0
    return 1 if failed or bad_exit or bench_bad else 0


if __name__ == "__main__":
    sys.exit(main())
