"""The eval group: composed by default, its values the schema's, each bad value refused up front in one line."""

from __future__ import annotations

import pytest

from clipexp.errors import ConfigError
from clipexp.names import HEADS


def test_the_default_eval_options_compose(compose_cfg):
    cfg = compose_cfg()
    assert list(cfg.eval.heads) == list(HEADS) and list(cfg.eval.shots) == [] and cfg.eval.draws == 5
    assert (cfg.eval.calibrate, cfg.eval.at_each_eval) == (True, False)
    assert (cfg.eval.conformal.alpha, cfg.eval.conformal.score, cfg.eval.conformal.mondrian) == (0.1, "lac", False)
    cfg = compose_cfg("eval.shots=[1,2,4,8,16]", "eval.heads=[prototype,linear]", "eval.conformal.score=aps")
    assert list(cfg.eval.shots) == [1, 2, 4, 8, 16] and list(cfg.eval.heads) == ["prototype", "linear"]
    assert list(compose_cfg("eval.heads=[]").eval.heads) == []  # heads off


@pytest.mark.parametrize("override,message", [
    ("eval.heads=[linear,svm]", "eval.heads=['linear', 'svm'] is invalid: a list of zero_shot, prototype, knn, linear, tip ([] for none)"),
    ("eval.shots=[0,4]", "eval.shots=[0, 4] is invalid: a list of integers >= 1"),
    ("eval.draws=0", "eval.draws=0 is invalid: an integer >= 1"),
    ("eval.conformal.alpha=0", "eval.conformal.alpha=0.0 is invalid: a miscoverage rate in (0, 1)"),
    ("eval.conformal.score=raps", "eval.conformal.score='raps' is invalid: one of lac, aps"),
])
def test_bad_eval_options_are_one_line_config_errors(compose_cfg, override, message):
    with pytest.raises(ConfigError) as err:
        compose_cfg(override)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
