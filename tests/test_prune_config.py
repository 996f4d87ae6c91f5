"""PruneConfig is checked once, when built; recipes become a config in one place; the method table."""

import dataclasses

import pytest

from sparsamba.cli import main
from sparsamba.errors import SparsambaError
from sparsamba.prune.config import PruneConfig, from_recipe
from sparsamba.prune.methods import METHODS, SCORES
from sparsamba.prune.pattern import Pattern, parse_pattern


@pytest.mark.parametrize(
    "kw,msg",
    [
        (
            dict(method="obc", pattern="2:4"),
            r"unknown method 'obc'; use one of magnitude, wanda, sparsegpt, c4",
        ),
        (dict(method="c4", pattern="c4", sparsity=1.0), r"sparsity must be in \[0, 1\)"),
        (dict(method="c4", pattern="c4", sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
        (
            dict(method="wanda", pattern="unstructured", sparsity=float("nan")),
            r"sparsity must be in \[0, 1\)",
        ),
        (dict(method="c4", pattern="c4", sparsity=0.5, score="fisher"), "unknown score 'fisher'"),
        (dict(method="c4", pattern="c4", sparsity=0.5, scope="layer"), "unknown scope 'layer'"),
        (dict(method="sparsegpt", pattern="c4n4"), "would remove every weight"),
    ],
)
def test_a_config_is_checked_when_built(kw, msg):
    with pytest.raises(SparsambaError, match=msg):
        PruneConfig(**kw)


def test_a_built_config_holds_the_parsed_pattern_and_is_frozen():
    cfg = PruneConfig(method="sparsegpt", pattern=" 2 : 4 ")
    assert cfg.pattern == parse_pattern("2:4") and isinstance(cfg.pattern, Pattern)
    assert cfg.to_dict()["pattern"] == "2:4"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 1.5
    with pytest.raises(SparsambaError, match=r"\[0, 1\)"):  # replace() builds, so it checks again
        dataclasses.replace(cfg, pattern="unstructured", sparsity=1.5)


def test_every_method_and_score_is_in_its_table():
    assert list(METHODS) == ["magnitude", "wanda", "sparsegpt", "c4"]
    assert set(SCORES) == {"obs", "wanda", "magnitude"}
    assert [m for m, v in METHODS.items() if v.compensate] == ["c4"]


def test_recipe_then_overrides(tmp_path):
    rec = tmp_path / "r.toml"
    rec.write_text(
        '[prune]\nmethod = "c4"\npattern = "c4"\nsparsity = 0.6\n[prune.learn]\nsteps = 7\nlr = 0.5\n'
    )
    cfg = from_recipe(str(rec), learn=dict(steps=None, lr=0.2), sparsity=None, scope="global")
    assert (cfg.sparsity, cfg.scope, cfg.learn.steps, cfg.learn.lr) == (0.6, "global", 7, 0.2)
    with pytest.raises(SparsambaError, match=r"sparsity must be in \[0, 1\)"):
        from_recipe(str(rec), sparsity=1.0)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--method", "obc", "--pattern", "2:4"], "unknown method 'obc'"),
        (["--method", "c4", "--sparsity", "1.5"], r"sparsity must be in [0, 1)"),
    ],
)
def test_cli_reports_the_config_error_before_any_work(tmp_path, capsys, args, msg):
    assert main(["prune", "-o", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "out").exists()
