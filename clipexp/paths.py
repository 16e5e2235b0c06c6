"""Where the project lives: the checkout or editable-install root and its Hydra config tree ``conf/``."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
