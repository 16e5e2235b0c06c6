"""``clipexp train [group=option ...] [key=value ...]`` (= ``python -m clipexp ...``): compose the run config and train.

``--help`` prints the short help (:mod:`clipexp.cli.help`); ``--help-all`` is Hydra's help with every key.

Before Hydra runs, a preflight pass checks the command line the way a user expects: an unknown
group option, a key that does not exist (with the nearest one suggested), a value of the wrong type or
out of range, a ``trainer.monitor`` the run does not log, a data file or model folder that is not there
each end the program with one line naming the key, the bad value and what is allowed, and exit code 2,
before the model loads.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this same ``main``: after the preflight it
starts the process group, rank 0 fixes the output folder's time stamp and sends it to the others, and
ranks > 0 run Hydra without ``.hydra/``, job log file or sweep callbacks, so one folder, one log and
one MLflow run come out of the job (see README "Scaling out").
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from clipexp.cli.help import short_help
from clipexp.config.compose import check_command_line, compose
from clipexp.config.schema import register_configs
from clipexp.errors import UsageError, UserError
from clipexp.paths import CONF_DIR

EXIT_USAGE = 2


def preflight(argv: List[str]):
    """Check the command line; return the composed run config (None for help, --cfg/--info, sweeps)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.shell_completion:
        return None
    sweeping = args.multirun or any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(args.overrides))
    if sweeping or args.cfg or args.info:
        check_command_line(args.overrides)
        return None
    return compose(args.overrides)


def check_output_folder(argv: List[str]) -> None:
    """The folder Hydra will write the run into can be written (a read-only or foreign folder is one line naming
    ``hydra.run.dir`` rather than Hydra's traceback)."""
    from pathlib import Path

    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = next((a.split("=", 1)[1] for a in argv if a.startswith(key + "=")), None)
    folder = Path(given or ("multirun" if multirun else "outputs")).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the run's output folder {folder}: {existing} is "
                         f"{'not a folder' if not existing.is_dir() else 'not writable'}; choose another with {key}=<folder> "
                         f"(or start from a folder you can write to)")


def with_resumed_run(argv: List[str]) -> List[str]:
    """``clipexp train trainer.resume=<run folder or checkpoint> [key=value ...]``: the run's own command line
    (``<run>/.hydra/overrides.yaml``) first, so the config is the one it trained with, then what is given now
    (it wins; the resume refuses a change to what the finished steps computed unless
    ``trainer.resume_allow_changes`` allows it), and the run's folder as the output folder. Anything else: as is."""
    from pathlib import Path

    from omegaconf import OmegaConf

    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("trainer.resume=")), None)
    if resume in (None, "latest", "latest_or_new"):
        return argv
    run_dir = Path(resume).expanduser()
    if run_dir.is_file():  # a checkpoint: <run>/checkpoints/step_*.pt
        run_dir = run_dir.parent.parent
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return argv
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    original = [o for o in OmegaConf.to_container(OmegaConf.load(saved)) if o.split("=", 1)[0].lstrip("+~") not in given
                and not o.startswith(("trainer.resume=", "hydra."))]
    out = [*original, *argv]
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        out.append(f"hydra.run.dir={run_dir.resolve()}")
    return out


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def start_distributed(cfg) -> List[str]:
    """Under torchrun: start the process group and make the ranks agree on one output folder.

    Rank 0 fixes the ``run_stamp`` (the folder name) and broadcasts it; every rank sets it as its own,
    so ``outputs/<stamp>`` (or ``multirun/<stamp>``) is the same folder on all of them. Returns the extra
    Hydra overrides of this rank: none for rank 0; for the others no ``.hydra/`` folder, no job log
    (errors still reach stderr) and no sweep callback (rank 0's opens the MLflow parent run).
    ``cfg`` (the preflight's composed config, None for a sweep) names the device and the timeout.
    """
    from clipexp.config.schema import TrainerConfig, run_stamp
    from clipexp.training.distributed import init_distributed

    device = cfg.device.type if cfg is not None else "auto"
    timeout = cfg.trainer.dist_timeout_s if cfg is not None else TrainerConfig.dist_timeout_s
    ctx = init_distributed(device, timeout)
    stamp = ctx.broadcast(run_stamp() if ctx.is_main else None)
    os.environ["CLIPEXP_RUN_STAMP"] = f"{os.getpid()}|{stamp}"
    if ctx.is_main:
        return []
    from omegaconf import OmegaConf

    callbacks = OmegaConf.select(OmegaConf.load(CONF_DIR / "config.yaml"), "hydra.callbacks", default=None) or {}
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
            *(f"~hydra.callbacks.{name}" for name in callbacks)]


def _task(cfg) -> Optional[float]:
    from clipexp.training.task import run

    return run(cfg)


def main(argv: Optional[List[str]] = None) -> None:
    import hydra

    from clipexp.training.distributed import destroy, env_world_size

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if any(a in ("-h", "--help") for a in sys.argv[1:]):  # the short help; Hydra's long one is --help-all
        print(short_help())
        sys.exit(0)
    sys.argv = [sys.argv[0], *with_resumed_run([("--help" if a == "--help-all" else a) for a in sys.argv[1:]])]
    try:
        cfg = preflight(sys.argv[1:])
        check_output_folder(sys.argv[1:])
        if cfg is not None:  # a refused resume leaves the run's folder as it was
            from clipexp.training.checkpoint import check_resume_before_start

            check_resume_before_start(cfg)
    except UserError as err:
        if _is_rank_zero():  # under torchrun every rank finds the same error; one line is enough
            print(f"clipexp: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    register_configs()
    distributed = env_world_size() > 1
    if distributed:
        sys.argv += start_distributed(cfg)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
    if distributed:
        destroy()

