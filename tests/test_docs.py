"""The docs: the configuration reference is generated (it cannot drift), every key is described, the MkDocs
site builds with --strict (a broken link, anchor or missing page fails), and the README stays short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_trainer_file_documents_every_key_once_from_the_schema(compose_cfg):
    """conf/trainer/default.yaml is generated from the schema: every trainer key, once, with its comment; and what it
    composes to is the schema's default (or the domain's, for the learning rate and the epochs)."""
    import dataclasses

    from clipexp.config.reference import render_trainer_yaml
    from clipexp.config.schema import TrainerConfig

    committed = (ROOT / "conf" / "trainer" / "default.yaml").read_text()
    assert committed == render_trainer_yaml(), "run: python -m clipexp.config.reference --trainer-yaml > conf/trainer/default.yaml"
    keys = [line.split(":", 1)[0] for line in committed.splitlines() if line and not line.startswith(("#", " "))]
    assert keys == [f.name for f in dataclasses.fields(TrainerConfig)]
    assert all(" # " in line and line.split(" # ", 1)[1].strip() for line in committed.splitlines() if line and not line.startswith("#"))
    composed = compose_cfg("domain=medical").trainer
    assert (composed.learning_rate, composed.num_epochs) == (3e-5, 15)  # the domain's
    assert composed.warmup_steps == TrainerConfig.warmup_steps and composed.monitor == TrainerConfig.monitor


def test_configuration_reference_is_the_generated_one():
    from clipexp.config.reference import render

    committed = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    assert committed == render(), "run: python -m clipexp.config.reference > docs/reference/configuration.md"


def test_every_key_and_every_option_is_described():
    from clipexp.config.reference import GROUPS, group_options, rows

    undescribed = [key for key, _, _, doc in rows() if not doc]
    assert not undescribed, f"add a comment beside these keys in clipexp/config/schema.py: {undescribed}"
    assert {p.parent.name for p in (ROOT / "conf").glob("*/*.yaml")} - {"launcher"} <= set(GROUPS)
    for group in GROUPS:
        options = group_options(group)
        assert options, group
        assert all(desc for _, desc, _ in options), [o for o, desc, _ in options if not desc]


def test_mkdocs_build_strict(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()


def test_readme_is_short_and_links_to_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    for link in [part.split(")")[0] for part in readme.split("](docs/")[1:]]:
        assert (ROOT / "docs" / link.split("#")[0]).is_file(), link
