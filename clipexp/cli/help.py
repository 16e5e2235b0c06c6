"""The short ``--help`` of ``clipexp`` and ``python -m clipexp``: the commands, the config groups (one line each:
what the group is, its options read from ``conf/``, the default marked ``*``) and a few examples.

Hydra's own help (every key of the composed config) stays behind ``--help-all``; ``--cfg job`` prints the
composed config of a command line.
"""

from __future__ import annotations

from typing import Dict, List

from clipexp.config.reference import GROUPS as GROUP_DESCRIPTIONS  # one line per group, shared with the docs
from clipexp.config.reference import config_groups, default_options
from clipexp.paths import CONF_DIR


COMMANDS: Dict[str, str] = {
    "train": "fine-tune and evaluate one config or a -m sweep (Hydra overrides); `python -m clipexp` is the same",
    "predict": "classify (the run's heads: calibrated, with prediction sets), zero-shot classify, embed or search images",
    "export": "write a finished run's outputs (model, plots, metrics) from its checkpoints",
    "shards": "write a dataset as WebDataset tar shards with a manifest (data=webdataset reads them)",
    "replay": "send a run's held MLflow writes to its store (after the store was down)",
    "upgrade": "rewrite older checkpoints in the current safe format",
    "ui": "open the MLflow UI on a run's store (or the current folder's)",
}

EXAMPLES = [
    ("clipexp train experiment=smoke", "a tiny model, a few steps: checks the install"),
    ("clipexp train experiment=quickstart", "the offline quick start: a tiny CLIP on the bundled textile images"),
    ("clipexp train data=csv data.path=pairs.csv trainer.max_steps=300", "your own image_path,caption[,label] CSV"),
    ("clipexp train -m loss=contrastive,siglip seed=1,2,3", "a sweep: one MLflow parent run, a child per job"),
    ("clipexp predict classify --model outputs/<date>/<time> --images imgs/ --head linear --out preds.csv", ""),
    ("clipexp ui outputs/<date>/<time>", "the MLflow UI on that run's store"),
]


def group_options() -> Dict[str, List[str]]:
    """{group: [options]} of ``conf/`` (one YAML per option), ``hydra/launcher`` with Hydra's ``basic``."""
    groups = config_groups()
    launchers = CONF_DIR / "hydra" / "launcher"
    groups["hydra/launcher"] = ["basic", *sorted(p.stem for p in launchers.glob("*.yaml"))]
    return groups


def short_help(prog: str = "clipexp") -> str:
    defaults = {**default_options(), "hydra/launcher": "basic"}
    groups = group_options()
    width = max(map(len, groups))
    lines = ["clipexp: fine-tune CLIP on a domain, evaluate retrieval and zero-shot accuracy, log to MLflow.", "",
             f"Usage: {prog} <command> [args]    (`python -m clipexp [overrides]` = `clipexp train [overrides]`)", "", "Commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Config groups of `clipexp train` (group=option; * = default):"]
    for group, options in groups.items():
        marked = ", ".join(o + ("*" if o == defaults.get(group) else "") for o in options)
        lines.append(f"  {group:<{width}}  {GROUP_DESCRIPTIONS.get(group, '')}: {marked}")
    lines += ["", "Examples:"]
    lines += [f"  {cmd}" + (f"    # {what}" if what else "") for cmd, what in EXAMPLES]
    lines += ["", "More: `clipexp <command> --help`; `clipexp train --help-all` lists every config key (Hydra's help);",
              "`clipexp train --cfg job [overrides]` prints the composed config."]
    return "\n".join(lines)
