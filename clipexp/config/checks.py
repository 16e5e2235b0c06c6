"""Up-front checks that need more than a value's range: metric names, config keys, paths.

* :func:`check_monitor`: ``trainer.monitor`` must name a metric the run's evaluations log (the names come
  from :func:`clipexp.evaluate.split_metric_names`, so they cannot drift from what is logged), with the
  ``monitor_mode`` that fits it (``min`` for losses and ranks).
* :func:`check_override_keys`: every ``key=value`` of a command line names a key of the run schema; an
  unknown one is reported with the nearest known key (``difflib``), before Hydra says "Could not override".
* :func:`check_paths`: the files and folders a run reads exist (the data, the eval data, a local model, a
  checkpoint to resume), so a typo fails before the model loads. The CLI runs it; ``validate`` does not
  (a config may be composed on one machine and run on another).

Each raises :class:`ConfigError` (one line: key, value, what is allowed).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

from clipexp.config.schema import EvalDataConfig, RunConfig
from clipexp.errors import ConfigError
from clipexp.evaluate import LOWER_IS_BETTER, split_metric_names

EMA = "ema/"


class UnknownKeyError(ConfigError):
    """A command-line key the run schema does not have: ``<key>=<value>: no such config key; did you mean ...``."""

    def __init__(self, key: str, value: str, hint: str):
        self.key, self.value, self.allowed = key, value, hint
        ValueError.__init__(self, f"{key}={value}: no such config key; {hint}")


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part, default) if isinstance(node, dict) else getattr(node, part, default)
    return node


def _labelled(data: Any) -> bool:
    """Whether a data section can give class labels (zero-shot metrics); folders and textile can."""
    source = _get(data, "source")
    if source in ("csv", "json", "hf"):
        return _get(data, "label_column") is not None
    if source == "webdataset":
        return _get(data, "label_key") is not None
    return True


def eval_metric_names(cfg: Any) -> List[str]:
    """Every metric an evaluation of this run logs, i.e. what ``trainer.monitor`` may name: ``val/<m>``, the
    eval_data set's ``<name>/<m>``, and ``ema/`` before each of those when ``trainer.ema.decay`` is set."""
    sets = [("val", _labelled(_get(cfg, "data")))]
    ev = _get(cfg, "eval_data")
    if ev is not None:
        sets.append((str(_get(ev, "name")), _labelled(ev)))
    names = [f"{prefix}/{m}" for prefix, labelled in sets for m in split_metric_names(labelled)]
    if _get(cfg, "trainer.ema.decay"):
        names += [EMA + n for n in names]
    return names


def check_monitor(cfg: Any) -> None:
    monitor, mode = str(_get(cfg, "trainer.monitor")), _get(cfg, "trainer.monitor_mode")
    names = eval_metric_names(cfg)
    zero_shot = monitor.rsplit("/", 1)[-1] in split_metric_names(True)[len(split_metric_names(False)):]
    if monitor not in names and zero_shot and monitor.replace("ema/", "", 1).startswith("val/") and not _labelled(_get(cfg, "data")):
        raise ConfigError("trainer.monitor", monitor, "a retrieval metric or the loss: zero-shot metrics need class labels "
                                                      "and this data has none (data.label_column / data.label_key is null)")
    if monitor not in names:
        near = difflib.get_close_matches(monitor, names, n=1, cutoff=0.5)
        val = [n for n in names if n.startswith("val/")]
        more = sorted({n.rsplit("/", 1)[0] + "/..." for n in names if not n.startswith("val/")})
        raise ConfigError("trainer.monitor", monitor, (f"did you mean {near[0]}? " if near else "")
                          + "a metric each evaluation logs: " + ", ".join(val) + (f" (and {', '.join(more)})" if more else ""))
    lower = monitor.endswith(LOWER_IS_BETTER)
    if mode == ("max" if lower else "min"):
        raise ConfigError("trainer.monitor_mode", mode, f"{'min' if lower else 'max'} for trainer.monitor={monitor} "
                                                        f"({'lower' if lower else 'higher'} is better)")
    optimized = _get(cfg, "optimized_metric")
    if optimized is not None and optimized not in names:
        raise ConfigError("optimized_metric", optimized, "a metric each evaluation logs, e.g. ${trainer.monitor}")


# ---------------------------------------------------------------------------------------------- keys
def _schema_keys(cls: type, prefix: str = "") -> Dict[str, bool]:
    """{dotted key: is a section} of a schema dataclass, through optional sub-sections."""
    out: Dict[str, bool] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        sub = next((a for a in inner if dataclasses.is_dataclass(a)), None)
        if cls is RunConfig and f.name == "eval_data":
            sub = EvalDataConfig
        out[prefix + f.name] = sub is not None
        if sub is not None:
            out.update(_schema_keys(sub, prefix + f.name + "."))
    return out


def known_keys() -> Dict[str, bool]:
    return _schema_keys(RunConfig)


def check_override_keys(overrides: List[str], groups: Optional[List[str]] = None) -> None:
    """Each ``key=value`` (not ``+key``, ``hydra.*`` or a ``group=option``) must name a schema key; the
    error names the nearest one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = known_keys()
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.key_or_group
        if ov.is_add() or ov.is_delete() or key.startswith("hydra") or key in (groups or []) or key in keys or ov.package is not None:
            continue
        if any(key.startswith(k + ".") and not section for k, section in keys.items()):
            continue  # inside a free-form value (a dict-valued key)
        section, _, name = key.rpartition(".")
        leaves = [k for k, is_section in keys.items() if not is_section]
        siblings = {k.rpartition(".")[2]: k for k in leaves if k.rpartition(".")[0] == section}
        near = [siblings[n] for n in difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.6)]
        if not siblings:  # a misspelt section: the nearest key anywhere
            near = difflib.get_close_matches(key, leaves, n=1, cutoff=0.75)
        if near:
            hint = f"did you mean {near[0]}?"
        elif section in keys:
            hint = f"the keys of {section}: " + ", ".join(k[len(section) + 1:] for k in keys if k.rpartition('.')[0] == section)
        else:
            hint = "the top-level keys: " + ", ".join(k for k in keys if "." not in k)
        value = (ov.input_line or "").partition("=")[2] or str(ov.value())
        raise UnknownKeyError(key, value, f"{hint} (`clipexp train --help-all` lists every key)")


# --------------------------------------------------------------------------------------------- paths
def _local(value: Optional[str]) -> bool:
    return bool(value) and (str(value).startswith(("/", "./", "../", "~")) or Path(str(value)).suffix in (".csv", ".json", ".pt"))


def check_paths(cfg: Any) -> None:
    """The files and folders the run reads exist (see the module docstring)."""
    for section in ("data", "eval_data"):
        data = _get(cfg, section)
        if data is None or not _get(data, "path"):
            continue
        source, path = _get(data, "source"), Path(str(_get(data, "path"))).expanduser()
        if source in ("csv", "json") and not path.is_file():
            raise ConfigError(f"{section}.path", str(_get(data, "path")), f"an existing {source.upper()} file ({path.absolute()} is not one)")
        if source in ("folder", "textile") and not path.is_dir():
            raise ConfigError(f"{section}.path", str(_get(data, "path")), f"an existing folder ({path.absolute()} is not one)")
        if source == "hf" and _local(str(_get(data, "path"))) and not path.exists():
            raise ConfigError(f"{section}.path", str(_get(data, "path")), "a dataset folder saved with save_to_disk, or a hub name")
    for key in ("model.name_or_path", "model.arch"):
        value = _get(cfg, key)
        if _local(value) and not Path(str(value)).expanduser().exists():
            raise ConfigError(key, value, "a hub id or an existing local folder (this path does not exist)")
    resume = _get(cfg, "trainer.resume")
    if resume not in (None, "latest", "latest_or_new") and not Path(str(resume)).expanduser().exists():
        raise ConfigError("trainer.resume", resume, "latest, latest_or_new, or an existing run folder or checkpoint file")
