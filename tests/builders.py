"""Test helpers that build what the config files describe, the way the trainer does."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from clipexp.paths import CONF_DIR

LOSS_OPTIONS = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))


def loss_config(name: str, domain: str = "general", loss_weight: float = 1.0, **arguments: Any) -> dict:
    """``conf/loss/<name>.yaml`` resolved (a domain section for domain_specific's interpolations), ``arguments`` on top."""
    node = OmegaConf.create({"domain": {"name": domain, "loss_weight": loss_weight}, "loss": OmegaConf.load(CONF_DIR / "loss" / f"{name}.yaml")})
    loss = OmegaConf.to_container(node, resolve=True)["loss"]
    loss.update(arguments)
    return loss


def loss_from_conf(name: str, domain: str = "general", loss_weight: float = 1.0, **arguments: Any):
    """The loss ``loss=<name>`` builds: its YAML's class, instantiated by Hydra with the YAML's arguments (and ``arguments``)."""
    from hydra.utils import instantiate

    return instantiate(loss_config(name, domain, loss_weight, **arguments), _convert_="all")
