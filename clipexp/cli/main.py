"""``clipexp <command>``: the one command line (the ``clipexp`` console script and ``python -m clipexp``).

Commands: ``train`` (Hydra overrides, ``-m`` sweeps: :mod:`clipexp.cli.train`), ``predict``
(:mod:`clipexp.serving.predict`), ``export`` (a run's outputs from its checkpoints), ``replay`` (held MLflow writes),
``upgrade`` (older checkpoints) and ``ui`` (the MLflow UI on a run's store). Arguments that start with no command name are ``train``'s, so
``python -m clipexp experiment=smoke`` and ``clipexp experiment=smoke`` still train; ``python -m clipexp`` alone
trains the defaults, while the ``clipexp`` script alone prints the short help.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from clipexp.cli.help import short_help
from clipexp.errors import UserError

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"clipexp: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _parser(name: str, description: str, examples: List[str]) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"clipexp {name}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))


def replay(argv: List[str]) -> int:
    p = _parser("replay", "Send the MLflow writes a run held back (its store was down or locked: <run dir>/mlflow_pending.jsonl) "
                "to its store now; a run the store no longer has (its file deleted or replaced) is recreated from the run "
                "folder's journal.", ["clipexp replay outputs/2026-01-31/12-00-00-000000",
                                      "clipexp replay outputs/<date>/<time> --tracking-uri http://127.0.0.1:5000"])
    p.add_argument("run_dir", type=Path, help="the run folder (holds mlflow_run.json and mlflow_pending.jsonl)")
    p.add_argument("uri", nargs="?", default=None, help=argparse.SUPPRESS)  # the old positional form
    p.add_argument("--tracking-uri", default=None, help="send them to this store instead of the one in mlflow_run.json")
    args = p.parse_args(argv)
    from clipexp.tracking.tracker import RUN_FILE, Tracker, replay_pending

    if not (args.run_dir / RUN_FILE).is_file():
        return _fail(f"{args.run_dir}: no {RUN_FILE} (not the folder of a tracked run)")
    if not (args.run_dir / Tracker.PENDING_FILE).is_file() and not (args.run_dir / Tracker.JOURNAL_FILE).is_file():
        print(f"nothing to send: {args.run_dir} has no {Tracker.PENDING_FILE}")
        return 0
    try:
        result = replay_pending(args.run_dir, args.tracking_uri or args.uri)
    except UserError as err:
        return _fail(str(err))
    if result["recreated_from"]:
        print(f"the store had no run {result['recreated_from']} (deleted or replaced): recreated it as run {result['run_id']} "
              f"from {args.run_dir / Tracker.JOURNAL_FILE} ({result['sent']} writes: params, tags, metrics, artifacts, status)")
    elif result["sent"]:
        print(f"sent {result['sent']} held writes to the run's MLflow store")
    else:
        print(f"nothing to send: {args.run_dir} has no {Tracker.PENDING_FILE}")
    return 0


def upgrade(argv: List[str]) -> int:
    p = _parser("upgrade", "Rewrite checkpoints written by older clipexp versions (numpy arrays inside) in the current format, "
                "in place; the original is kept as <name>.old.", ["clipexp upgrade outputs/<date>/<time>/checkpoints/step_000100.pt",
                                                                   "clipexp upgrade outputs/*/*/checkpoints/*.pt"])
    p.add_argument("checkpoints", nargs="+", type=Path, metavar="CHECKPOINT")
    args = p.parse_args(argv)
    from clipexp.training.checkpoint import upgrade as upgrade_checkpoint

    for path in args.checkpoints:
        if not path.is_file():
            return _fail(f"{path}: no such checkpoint file")
        try:
            print(f"upgraded {path} (the original is {upgrade_checkpoint(path)})")
        except UserError as err:
            return _fail(str(err))
    return 0


def export(argv: List[str]) -> int:
    p = _parser("export", "Write a finished run's outputs (plots, metrics.json, model/, the MLflow model) from its checkpoints, "
                "without training: what a run that could not write them at its end (a full disk) names.",
                ["clipexp export outputs/2026-01-31/12-00-00-000000",
                 "clipexp export outputs/<date>/<time> tracking.uri=sqlite:////data/mlflow.db"])
    p.add_argument("run_dir", type=Path, help="the run folder (outputs/<date>/<time>), with checkpoints/")
    p.add_argument("overrides", nargs="*", help="key=value on top of the checkpoint's config (where it logs, not what it computed)")
    args = p.parse_args(argv)
    import logging

    from clipexp.tracking.outputs import summary_table
    from clipexp.training.task import export as export_run

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        results = export_run(args.run_dir, args.overrides)
    except UserError as err:
        return _fail(str(err))
    print(summary_table(results))
    print(f"outputs: {args.run_dir}\nmodel:   {args.run_dir / 'model'}\nmetrics: {args.run_dir / 'metrics.json'}")
    return 0


def ui_command(argv: List[str]) -> Optional[tuple]:
    """The ``mlflow ui`` command line for ``clipexp ui`` and the parsed arguments (None after a one-line error)."""
    p = _parser("ui", "Open the MLflow UI (mlflow ui) on a run's store: the one named in <run dir>/mlflow_run.json, else the "
                "store rule's (MLFLOW_TRACKING_URI, else ./mlflow.db of the current folder).",
                ["clipexp ui                               # ./mlflow.db, http://127.0.0.1:5000",
                 "clipexp ui outputs/<date>/<time> --port 5001",
                 "clipexp ui --backend-store-uri sqlite:////data/mlflow.db"])
    p.add_argument("run_dir", nargs="?", type=Path, default=None, help="a run (or sweep) folder; its mlflow_run.json names the store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only) or 0.0.0.0")
    p.add_argument("--backend-store-uri", default=None, help="this store instead")
    p.add_argument("--workers", type=int, default=1, help="server processes (1 is plenty for one person)")
    p.add_argument("--experiment", default=None, help="open this experiment's runs (default: the run folder's, else the latest run's)")
    p.add_argument("--no-browser", action="store_true", help="print the address only (a browser opens only on a desktop session)")
    p.add_argument("--print-command", action="store_true", help="print the mlflow command and exit")
    args = p.parse_args(argv)
    from clipexp.tracking.tracker import RUN_FILE, artifact_root, default_tracking_uri, resolve_uri

    store = args.backend_store_uri and resolve_uri(args.backend_store_uri)
    if store is None and args.run_dir is not None:
        meta = args.run_dir / RUN_FILE
        if not meta.is_file():
            _fail(f"{args.run_dir}: no {RUN_FILE} (not the folder of a tracked run); give a run folder or --backend-store-uri")
            return None
        store = json.loads(meta.read_text())["uri"]
    store = store or default_tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers)]
    root = artifact_root(store)
    if root is not None:
        cmd += ["--artifacts-destination", str(root)]
    return cmd, args


def ui(argv: List[str]) -> int:
    parsed = ui_command(argv)
    if parsed is None:
        return EXIT_USAGE
    cmd, args = parsed
    if args.print_command:
        print(" ".join(cmd))
        return 0
    import subprocess

    from clipexp.tracking.ui import graphical_browser, served_base, ui_addresses

    store, base = cmd[cmd.index("--backend-store-uri") + 1], served_base(args.host, args.port)
    run = json.loads((args.run_dir / "mlflow_run.json").read_text()) if args.run_dir is not None and not args.backend_store_uri else None
    pages = ui_addresses(store, base, run, args.experiment)
    print(f"MLflow UI on {store} at {base} (Ctrl-C stops it)\nruns (model training): {pages['runs']}"
          + (f"\nthis run: {pages['run']}" if "run" in pages else ""), flush=True)
    if not args.no_browser and graphical_browser():  # opens the page once the server answers, beside it
        subprocess.Popen([sys.executable, "-m", "clipexp.tracking.ui", pages.get("run", pages["runs"]), f"{base}/health"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # MLflow's job runner (GenAI evaluation jobs, ~10 processes) is off unless asked for: training runs do not use it
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, cmd)  # the process becomes the UI server: Ctrl-C and kill reach it directly
    return 0  # not reached


def shards(argv: List[str]) -> int:
    from clipexp.data.to_shards import main as shards_main

    return shards_main(argv, prog="clipexp shards")


def predict(argv: List[str]) -> int:
    from clipexp.serving.predict import main as predict_main

    return predict_main(argv, prog="clipexp predict")


def train(argv: List[str]) -> int:
    from clipexp.cli.train import main as train_main

    train_main(argv)
    return 0


COMMANDS = {"train": train, "predict": predict, "export": export, "shards": shards, "replay": replay, "upgrade": upgrade, "ui": ui}


def main(argv: Optional[List[str]] = None, bare: str = "help") -> None:
    """Dispatch ``argv`` (default ``sys.argv[1:]``). ``bare``: what no arguments at all do, ``help`` (the
    console script) or ``train`` (``python -m clipexp``, unchanged)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and bare == "help":
        print(short_help())
        sys.exit(0)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(short_help())
        sys.exit(0)
    if argv and argv[0] in COMMANDS:
        sys.exit(COMMANDS[argv[0]](argv[1:]))
    if argv and argv[0][:1] not in ("-", "~", "+") and "=" not in argv[0]:
        sys.exit(_fail(f"unknown command {argv[0]!r}: one of {', '.join(COMMANDS)} (or Hydra overrides key=value for train; "
                       f"`clipexp --help`)"))
    sys.exit(train(argv))


if __name__ == "__main__":
    main()
