"""benchmarks/gpu_check.py (``make gpu-check``) and what it carries, without a GPU: the budget that skips
a part with its reason, the summary written to ``$OUT``, pytest's results read back, the carried size, and the
wheel pins of the Makefile against the versions this project is tested with."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_a_budget_too_small_skips_each_part_with_its_reason_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--budget", "10"]) == 0  # nothing failed: everything skipped, each with its reason
    summary = (tmp_path / "gpu-check.md").read_text()
    assert summary.startswith("# clipexp GPU check\n") and "of the 10 s budget" in summary
    assert "## Tests\n\nskipped: " in summary and "the tests need at least 60 s" in summary
    why = "the GPU benchmark needs at least 150 s" if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False here)"
    assert f"## Throughput, GPU mode\n\nskipped: {why}" in summary
    assert f"summary: {tmp_path / 'gpu-check.md'}" in capsys.readouterr().out


def test_pytest_results_are_read_back_with_the_skip_reason_and_the_failure(tmp_path):
    (tmp_path / "test_three.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert 1 + 1 == 2\n"
        "def test_wrong():\n    assert 2 * 2 == 5, 'arithmetic'\n"
        "@pytest.mark.skip(reason='needs a CUDA GPU')\ndef test_gpu():\n    pass\n")
    xml = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "test_three.py"],
                   cwd=tmp_path, capture_output=True, text=True)
    rows = {r["test"]: r for r in gpu_check.junit_results(xml)}
    assert {k: r["result"] for k, r in rows.items()} == {"test_three::test_ok": "passed", "test_three::test_wrong": "FAILED",
                                                          "test_three::test_gpu": "skipped"}
    assert rows["test_three::test_gpu"]["detail"] == "needs a CUDA GPU"
    assert "arithmetic" in rows["test_three::test_wrong"]["detail"]


def test_carried_size_counts_the_checkout_and_the_wheels(tmp_path, capsys):
    (tmp_path / "a.whl").write_bytes(b"\0" * 2**20)
    assert gpu_check.carry_size(tmp_path, limit_mib=60) == 0
    line = capsys.readouterr().out
    tree = float(re.search(r"tree ([\d.]+) MiB", line).group(1))
    assert 0.5 < tree < 20 and f"{tmp_path} 1.0 MiB" in line  # this checkout: about a megabyte of sources and docs
    assert gpu_check.carry_size(tmp_path, limit_mib=tree + 0.5) == 1  # the wheel pushes it over


def test_the_wheels_pinned_for_the_gpu_are_the_versions_installed_here():
    """make gpu-wheels fetches exactly what the suite runs with (pyproject's ranges would let them drift)."""
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"^GPU_PACKAGES = (.*?)(?<!\\)\n", text, re.S | re.M).group(1).replace("\\\n", " ")
    pins = dict(p.split("==") for p in block.split())
    assert {"hydra-core", "omegaconf", "open-clip-torch", "conformal-clip-data"} <= set(pins)
    assert {name: metadata.version(name) for name in pins} == pins
    image = {ln.strip().lower() for ln in (ROOT / "benchmarks" / "gpu" / "image-packages.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert not set(pins) & image and {"torch", "transformers", "timm", "pytest"} <= image



def test_a_part_over_its_time_is_stopped_with_the_processes_it_started(tmp_path):
    """The benchmark runs its measurements in processes of their own: at the timeout they go too."""
    import os
    import time

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    t0 = time.perf_counter()
    code, out = gpu_check.run_bounded([sys.executable, "-c", script], timeout=5)
    assert code == "timeout" and time.perf_counter() - t0 < 30
    assert out.startswith("started") and out.rstrip().endswith("stopped after 5 s")
    child = int(pid_file.read_text())
    for _ in range(50):  # reaped by init once killed
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} still runs")
