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
from clipexp.config.checks import check_override_keys, check_paths
from clipexp.config.reference import config_groups
from clipexp.config.schema import register_configs
from clipexp.config.validate import validate
from clipexp.errors import ConfigError
from clipexp.paths import CONF_DIR

EXIT_USAGE = 2


class UsageError(ConfigError):
    """A command-line problem found while composing (message is already one line)."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)


def _first_lines(err: BaseException) -> str:
    parts: List[str] = []
    while err is not None:
        line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if line and "$" not in line and line not in parts:
            parts.append(line)
        err = err.__cause__ or err.__context__
    return ": ".join(parts)


def check_group_options(overrides: List[str]) -> None:
    """Every ``group=option`` (sweeps included) must name an existing file in that group."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors; reported as one line
        raise UsageError(f"cannot parse the overrides: {_first_lines(err)}") from None
    groups = config_groups()
    for ov in parsed:
        group = ov.key_or_group.lstrip("+~")
        if group not in groups or ov.is_delete():
            continue
        value = ov.value()
        values = value.list if isinstance(value, ChoiceSweep) else [value]
        for v in values:
            if v is not None and str(v) not in groups[group]:
                raise ConfigError(group, str(v), "one of " + ", ".join(groups[group]))


def compose_and_validate(overrides: List[str]):
    """Compose the run config as Hydra will and validate it; raise ConfigError on the first problem."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    except Exception as err:  # noqa: BLE001 - composition errors become one line
        optional = next((o.split("=", 1)[0] for o in overrides if o.startswith("eval_data.")), None)
        if optional and not any(o.startswith("eval_data=") for o in overrides):
            raise UsageError(f"{optional}: there is no eval_data section to set; choose one first, e.g. eval_data=csv "
                             f"(one of {', '.join(config_groups()['eval_data'])})") from None
        raise UsageError(_first_lines(err)) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        validate(cfg)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. a missing mandatory value or a bad interpolation
        raise UsageError(_first_lines(err)) from None
    return cfg


def preflight(argv: List[str]):
    """Check the command line; return the composed run config (None for help, --cfg/--info, sweeps)."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.shell_completion:
        return None
    check_group_options(args.overrides)
    check_override_keys(args.overrides, groups=list(config_groups()))
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeping = args.multirun or any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(args.overrides))
    if not sweeping and not args.cfg and not args.info:
        cfg = compose_and_validate(args.overrides)
        check_paths(cfg)  # the files it reads exist (not in compose_and_validate: a config may be made for another machine)
        return cfg
    return None


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
    sys.argv = [("--help" if a == "--help-all" else a) for a in sys.argv]
    try:
        cfg = preflight(sys.argv[1:])
    except ConfigError as err:
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


if __name__ == "__main__":
    main()
