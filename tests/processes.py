"""Helpers for tests that drive a training run in a subprocess."""

import time
from pathlib import Path


def wait_for(path: Path, proc, timeout: float = 300) -> None:
    """Poll until ``path`` exists; fail with the process's stderr if it exits first, or after ``timeout`` s."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)
