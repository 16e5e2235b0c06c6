"""``python -m clipexp.training.export <run folder> [key=value ...]``: write a finished run's outputs from its checkpoints.

The command a run prints when the disk filled while it wrote its outputs (:mod:`clipexp.training.finishing`):
once there is space again, it makes what the end of the run would have made, in the run folder and in the
same MLflow run:

* the config and the loop position come from the run folder's newest readable step checkpoint (the
  last step's: it holds the resolved config, the history and the results), the weights from ``best.pt``;
* the trainer is rebuilt as the run had it (its data, its model) and resumed at the last step, so nothing
  is trained: the test evaluation with the best weights (and WiSE-FT, when the run used it), the plots,
  ``metrics.json``, ``config.yaml``, ``model/`` with its ``SHA256SUMS`` and the MLflow model are written,
  and the MLflow run, FAILED by the full disk, is marked FINISHED (tagged ``exported_by``).

``key=value`` overrides apply on top of the checkpoint's config (e.g. ``tracking.uri=...`` for a store
that moved, or ``tracking.pyfunc_model=false``); keys that change what was computed are refused as a
resume would refuse them. Exit code 0 when done; 2 with one line when the folder has no usable checkpoint
or the run had not finished training (resume it with ``trainer.resume=<run folder>`` instead).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from clipexp.errors import ConfigError

PROG = "clipexp.training.export"


def export(run_dir: Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Write ``run_dir``'s outputs from its checkpoints; returns the run's results (as ``Trainer.train``)."""
    from omegaconf import OmegaConf

    from clipexp.config.schema import RunConfig
    from clipexp.training.checkpoint import checkpoint_candidates
    from clipexp.training.resume import pick_checkpoint
    from clipexp.training.trainer import Trainer

    run_dir = Path(run_dir).expanduser().resolve()
    if not checkpoint_candidates(run_dir):
        raise ConfigError("run folder", str(run_dir), f"a run folder with step checkpoints (there is no checkpoint in "
                                                      f"{run_dir / 'checkpoints'}): the export writes a run's outputs from them")
    path, state = pick_checkpoint(str(run_dir), run_dir, "cpu")  # the newest readable step checkpoint, or one line
    if not state.get("config"):
        raise ConfigError("run folder", str(run_dir), f"a run folder whose checkpoints hold their config ({path} has none)")
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), state["config"], OmegaConf.from_dotlist(list(overrides)))
    cfg.trainer.resume = str(run_dir)
    hydra_dir = run_dir / ".hydra"
    trainer = Trainer(cfg, run_dir, hydra_dir=hydra_dir if hydra_dir.is_dir() else None)
    try:
        trainer.setup()
        if trainer.step < trainer.total_steps:
            raise ConfigError("run folder", str(run_dir), f"a run that finished training ({path} is step {trainer.step} of "
                                                          f"{trainer.total_steps}); resume it with trainer.resume={run_dir}")
        results = trainer.train()  # at the last step: only the end of the run (finish) runs
        trainer.tracker.set_tags({"exported_by": f"python -m {PROG} {run_dir}"})
        return results
    finally:
        trainer.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from clipexp.data.problems import DataValidationError
    from clipexp.device import DeviceError
    from clipexp.models.clip import ModelLoadError
    from clipexp.tracking.outputs import summary_table
    from clipexp.training.checkpoint import CheckpointWriteError
    from clipexp.training.finishing import ExportWriteError

    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run folder (outputs/<date>/<time>), with checkpoints/")
    parser.add_argument("overrides", nargs="*", help="key=value on top of the checkpoint's config")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        results = export(args.run_dir, args.overrides)
    except (ConfigError, DeviceError, ModelLoadError, DataValidationError, CheckpointWriteError, ExportWriteError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    out = args.run_dir
    print(summary_table(results))
    print(f"outputs: {out}\nmodel:   {out / 'model'}\nmetrics: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
