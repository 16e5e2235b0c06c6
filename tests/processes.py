"""Helpers for tests that drive a training run in a subprocess."""

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path


def wait_for(path: Path, proc, timeout: float = 300) -> None:
    """Poll until ``path`` exists; fail with the process's stderr if it exits first, or after ``timeout`` s."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def wait_for_http(url: str, proc, timeout: float = 120, what: str = "the server") -> None:
    """Poll ``url`` until it answers 200; fail with the process's output if it exits first, or after ``timeout`` s."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, (proc.stdout or proc.stderr).read()[-2000:]
        assert time.time() < deadline, f"{what} did not start"
        time.sleep(0.5)


def stop_group(proc, timeout: float = 30) -> None:
    """Stop a server started with ``start_new_session=True`` and every process it started (one process group):
    SIGTERM, then SIGKILL after ``timeout`` s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
