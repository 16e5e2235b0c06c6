"""The configuration reference, generated from the schema and ``conf/`` so it cannot drift from them.

    python -m clipexp.config.reference > docs/reference/configuration.md

Every config group's options come from ``conf/<group>/*.yaml`` (each file's leading comment describes it).
Every key comes from the dataclasses in :mod:`clipexp.config.schema` (type, and where it is
documented: the comment on its line or the lines just above it), with its default as ``python -m clipexp``
composes it, and, where the schema says nothing, the comment beside the key in the group's default option.
``tests/test_docs.py`` checks that the committed page equals this output and that every key has a description.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from clipexp.paths import CONF_DIR

# the config groups in the order a user meets them, each with one line (also the CLI's short help)
GROUPS: Dict[str, str] = {
    "model": "the model to fine-tune: CLIP, SigLIP or open_clip (hub id, local folder or a tiny built one)",
    "domain": "prompts, augmentation, learning rate and epochs of an image domain",
    "loss": "the training objective (a class and its arguments)",
    "temperature_schedule": "how the loss temperature changes over the steps (constant: it does not)",
    "data": "where the image-text pairs come from (data.path=... for files)",
    "device": "where to train; precision auto = bf16 where supported",
    "trainer": "steps, batch, warm-up, evaluation, checkpoints (trainer.<key>=...)",
    "tracking": "MLflow on or off (tracking.uri, tracking.experiment, tracking.system_metrics)",
    "eval": "heads on the image embeddings: few-shot classifiers, calibrated probabilities, prediction sets",
    "eval_data": "an extra evaluation-only set (e.g. what fine-tuning forgets)",
    "experiment": "presets that set several groups and keys at once",
    "hparams_search": "Optuna search over hyperparameters (with -m)",
    "hydra/launcher": "how -m sweeps run their jobs (basic = one after another)",
}


def config_groups() -> Dict[str, List[str]]:
    """{group: [options]} of the config tree (one YAML per option)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and any(d.glob("*.yaml"))}


def default_options() -> Dict[str, Optional[str]]:
    """{group: default option} from ``conf/config.yaml``'s defaults list (None: an optional group)."""
    from omegaconf import OmegaConf

    out: Dict[str, Optional[str]] = {}
    for item in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml")).get("defaults", []):
        if isinstance(item, dict):
            for key, value in item.items():
                out[key.replace("optional ", "").strip()] = value
    return out


def option_description(path: Path) -> str:
    """A config file's leading comment, joined into one paragraph (the ``@package`` line and an
    experiment's command line left out: the command is shown separately)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package") or text.startswith("python -m clipexp") or not text:
            continue
        lines.append(text)
    return " ".join(lines)


def option_command(path: Path) -> Optional[str]:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("python -m clipexp"):
            return text
    return None


def group_options(group: str) -> List[Tuple[str, str, Optional[str]]]:
    """``[(option, description, command)]`` of a config group, from its YAML files."""
    return [(p.stem, option_description(p), option_command(p)) for p in sorted((CONF_DIR / group).glob("*.yaml"))]


def _comments(source: str) -> Dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out: Dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_docs(cls: type) -> Dict[str, str]:
    """A dataclass's field -> its comment: on the field's own line, else the comment lines right above it."""
    source = inspect.getsource(sys.modules[cls.__module__])
    comments = _comments(source)
    lines = source.splitlines()
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs: Dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        text = comments.get(stmt.lineno, "")
        if not text:
            above, n = [], stmt.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments.get(n, ""))
                n -= 1
            text = " ".join(t for t in above if t)
        docs[stmt.target.id] = text
    return docs


def _yaml_comments(path: Path) -> Dict[str, str]:
    """``key: value  # comment`` -> {dotted key: comment} for a group option's file (two levels deep)."""
    out: Dict[str, str] = {}
    stack: List[Tuple[int, str]] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if "#" in line:
            out[".".join(k for _, k in stack)] = line.split("#", 1)[1].strip()
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null" if len(args) == 1 else " | ".join(_type_name(a) for a in args)
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _format(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


def _schema_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def walk_keys(cls: type, prefix: str = "", own_only: bool = False) -> Iterator[Tuple[str, str, str, Optional[type], Any]]:
    """``(dotted key, type, description, nested dataclass or None, schema default)`` for every field, depth
    first; ``own_only``: the fields a subclass adds (``eval_data`` adds three to ``data``'s)."""
    hints = typing.get_type_hints(cls)
    docs = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(_field_docs(base))
    inherited = {f.name for b in cls.__mro__[1:] if dataclasses.is_dataclass(b) for f in dataclasses.fields(b)} if own_only else set()
    for f in dataclasses.fields(cls):
        if f.name in inherited:
            continue
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] if typing.get_origin(tp) is typing.Union else []
        nested = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        yield f"{prefix}{f.name}", _type_name(tp), docs.get(f.name, ""), nested, _schema_default(f)
        if nested is not None:
            yield from walk_keys(nested, f"{prefix}{f.name}.", own_only=f.name == "eval_data")


def default_config() -> Dict[str, Any]:
    """``python -m clipexp``'s composed config (interpolations resolved), as plain containers."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from clipexp.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["eval_data=csv"])  # with eval_data's keys (eval_data=csv's values)
    return OmegaConf.to_container(cfg, resolve=True)


_UNSET = object()


def _lookup(cfg: Dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


def rows() -> List[Tuple[str, str, str, str]]:
    """``(key, type, default, description)`` of every leaf key of the run config."""
    from clipexp.config.schema import RunConfig

    cfg = default_config()
    yaml_docs: Dict[str, str] = {}
    for group, option in default_options().items():
        if option is None:
            continue
        yaml_docs.update({f"{group}.{k}": v for k, v in _yaml_comments(CONF_DIR / group / f"{option}.yaml").items()})
    out = []
    for key, type_name, doc, nested, schema_default in walk_keys(RunConfig):
        if nested is not None:
            continue
        doc = doc or yaml_docs.get(key, "")
        default = _lookup(cfg, key)
        if default is _UNSET:  # model.architecture: only built models set it
            default = schema_default
        default = _format(default)
        if key in ("trainer.learning_rate", "trainer.num_epochs", "loss.domain", "loss.domain_weight"):
            default += " (from the domain)"
        out.append((key, type_name, default, doc))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `clipexp/config/schema.py` and `conf/` by `python -m clipexp.config.reference`; do not edit",
             "by hand. Set any key on the command line (`trainer.max_steps=500`), choose a group's option with",
             "`group=option` (`loss=siglip`), and print a composed config with `python -m clipexp --cfg job ...`.",
             "Values are checked once, up front; an unknown key or option is one line naming the nearest known one.",
             "", "## Config groups", ""]
    defaults = default_options()
    for group, what in GROUPS.items():
        options = group_options(group)
        default = defaults.get(group)
        lines += [f"### `{group}`", "", what[0].upper() + what[1:] + ".", "", "| option | what it is |", "|---|---|"]
        for name, desc, command in options:
            label = f"`{name}`" + (" (default)" if name == default else "")
            extra = f" Run: `{command}`." if command else ""
            lines.append(f"| {label} | {_cell(desc + extra)} |")
        lines.append("")
    lines += ["## Keys", "",
              "Defaults are those of `python -m clipexp` with no arguments; a group option or preset may set others",
              "(`model=tiny` sets `model.name_or_path: null`). `eval_data.*` (with `eval_data=csv`) also takes every `data.*` key.", ""]
    section = None
    for key, type_name, default, doc in rows():
        top = key.split(".")[0] if "." in key else "(top level)"
        if top != section:
            section = top
            lines += [f"### `{top}`" if top != "(top level)" else "### Top level", "", "| key | type | default | description |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | {type_name} | `{_cell(default)}` | {_cell(doc)} |")
    return "\n".join(lines).rstrip() + "\n"


#: trainer keys whose default is the domain's (an interpolation in the generated file)
FROM_DOMAIN = {"learning_rate": "${domain.learning_rate}", "num_epochs": "${domain.num_epochs}"}


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def render_trainer_yaml() -> str:
    """``conf/trainer/default.yaml``: every trainer key once, with its schema default and the schema's comment, in the
    schema's sections (torchtune-style: the file documents what it sets)."""
    from clipexp.config.schema import TrainerConfig

    source = inspect.getsource(sys.modules[TrainerConfig.__module__])
    docs = _field_docs(TrainerConfig)
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == TrainerConfig.__name__)
    lines = source.splitlines()
    out = ["# The trainer: every key once, with its default and what it does. Set any on the command line (trainer.max_steps=500).",
           "# Generated from clipexp/config/schema.py (TrainerConfig) by `python -m clipexp.config.reference --trainer-yaml`;",
           "# edit the schema, not this file (tests/test_docs.py checks they agree)."]
    fields = {f.name: f for f in dataclasses.fields(TrainerConfig)}
    previous = node.body[0].lineno - 1
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        for header in lines[previous:stmt.lineno - 1]:
            if header.strip().startswith("# ---"):
                out += ["", "# " + header.strip()[len("# ---"):].strip()]
        previous = stmt.lineno
        name, f = stmt.target.id, fields[stmt.target.id]
        default = _schema_default(f)
        if dataclasses.is_dataclass(default):
            out.append(f"{name}:{'':<{max(1, 31 - len(name))}}# {docs[name]}")
            sub_docs = _field_docs(type(default))
            for sub in dataclasses.fields(default):
                value = _yaml_value(getattr(default, sub.name))
                out.append(f"  {sub.name}: {value:<{max(1, 27 - len(sub.name))}} # {sub_docs.get(sub.name, '')}")
            continue
        value = FROM_DOMAIN.get(name) or _yaml_value(default)
        out.append(f"{name}: {value:<{max(1, 30 - len(name))}} # {docs[name]}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_trainer_yaml() if "--trainer-yaml" in sys.argv else render())
