"""One kind of user error: every error clipexp defines is a :class:`clipexp.errors.UserError` (one line, what to do),
and the places that print ``error:`` lines (the command line, the Hydra task, predict) catch that one class, so
anything else is a bug and keeps its traceback."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import clipexp
from clipexp.errors import UserError

PACKAGE = Path(clipexp.__file__).parent
#: where an error becomes a line a user reads (an ``error:`` on stderr and an exit code)
PRINTERS = ["cli/main.py", "cli/train.py", "training/task.py", "serving/predict.py"]


def _modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="clipexp."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def test_every_error_clipexp_defines_is_a_user_error():
    defined = {(m.__name__, name): obj for m in _modules() for name, obj in vars(m).items()
               if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == m.__name__}
    assert len(defined) >= 10, sorted(defined)  # errors.py and the few that carry their own fields
    others = sorted(f"{mod}.{name}" for (mod, name), cls in defined.items() if not issubclass(cls, UserError))
    assert not others, f"errors that are not UserErrors (a user would get a traceback): {others}"
    assert all(cls.exit_code in (1, 2) for cls in defined.values())


def _handlers(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.name:
            yield node


@pytest.mark.parametrize("printer", PRINTERS)
def test_the_printers_turn_only_user_errors_into_a_line(printer):
    """A handler that prints the error as a line (``error: {err}``) or passes it to ``_fail`` catches UserError; a
    handler catching anything broader re-raises what is not a UserError (``isinstance(err, UserError)``)."""
    path = PACKAGE / printer
    for handler in _handlers(path):
        source = ast.get_source_segment(path.read_text(), handler)
        prints = "error: {err}" in source or "_fail(str(err))" in source
        if not prints:
            continue
        caught = ast.unparse(handler.type)
        assert caught == "UserError" or "isinstance(err, UserError)" in source, f"{printer}:{handler.lineno} catches {caught}"


def test_a_bug_keeps_its_traceback(run_cli, tmp_path):
    """An error no check foresaw (here a ZeroDivisionError planted in the evaluation by a start-up hook) is a bug: the
    run ends with its traceback and exit code 1, never as a tidy ``clipexp: error:`` line that would hide it."""
    import os

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import clipexp.evaluate as e\n"
        "def broken(*a, **k):\n"
        "    raise ZeroDivisionError('planted by the test')\n"
        "e.evaluate_retrieval = broken\n")
    root = Path(__file__).resolve().parents[1]
    res = run_cli("experiment=smoke", "tracking.enabled=false", env={"PYTHONPATH": f"{hook}{os.pathsep}{root}"}, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback (most recent call last)" in res.stderr and "ZeroDivisionError: planted by the test" in res.stderr
    assert "clipexp: error:" not in res.stderr
