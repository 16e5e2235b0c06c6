"""One run config from a command line, as Hydra will compose it, checked before anything loads.

:func:`compose` is what ``clipexp train`` does before Hydra starts the job (so a mistake costs one line, exit code 2
and no output folder) and what tests, notebooks and the original notes' ``CLIPFinetuningConfig`` use to get the
config a command line means: the ``group=option`` choices are checked against ``conf/``, the ``key=value`` keys
against the schema and the chosen loss's and temperature schedule's arguments, then the config is composed and
:func:`~clipexp.config.validate.validate`\\ d.
"""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from clipexp.config.reference import config_groups
from clipexp.config.schema import register_configs
from clipexp.config.validate import check_group_options, check_override_keys, first_lines, validate
from clipexp.errors import UsageError
from clipexp.paths import CONF_DIR

#: the sections a group file fills with a class's arguments (their keys are checked against the class)
COMPONENTS = ("loss", "temperature_schedule")


def compose_unchecked(overrides: Sequence[str]) -> DictConfig:
    """The run config Hydra composes from ``overrides`` (composition errors as one line; nothing else checked)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=[o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    except Exception as err:  # noqa: BLE001 - composition errors become one line
        optional = next((o.split("=", 1)[0] for o in overrides if o.startswith("eval_data.")), None)
        if optional and not any(o.startswith("eval_data=") for o in overrides):
            raise UsageError(f"{optional}: there is no eval_data section to set; choose one first, e.g. eval_data=csv "
                             f"(one of {', '.join(config_groups()['eval_data'])})") from None
        raise UsageError(first_lines(err)) from None
    finally:
        GlobalHydra.instance().clear()


def check_command_line(overrides: Sequence[str]) -> None:
    """The group options and keys of a command line (sweeps included: every value of a sweep is checked)."""
    overrides = list(overrides)
    groups = config_groups()
    check_group_options(overrides, groups)
    # the loss and schedule the command line chooses (its group options and presets, without its key=value overrides)
    choices = [o for o in overrides if "=" in o and (o.split("=", 1)[0].lstrip("+~") in groups or o.startswith(("+experiment", "experiment")))
               and "," not in o.split("=", 1)[1]]
    chosen = compose_unchecked(choices)
    check_override_keys(overrides, groups, {section: chosen[section] for section in COMPONENTS})


def compose(overrides: Sequence[str] = (), check_files: bool = True) -> DictConfig:
    """The run config of ``overrides`` (``["model=tiny", "trainer.max_steps=4", ...]``), checked: raises
    :class:`~clipexp.errors.ConfigError` / :class:`~clipexp.errors.UsageError` (one line) on the first problem."""
    overrides = list(overrides)
    check_command_line(overrides)
    cfg = compose_unchecked(overrides)
    try:
        validate(cfg, check_files=check_files)
    except OmegaConfBaseException as err:  # a missing mandatory value (???) or an interpolation that does not resolve
        raise UsageError(first_lines(err)) from None
    return cfg
