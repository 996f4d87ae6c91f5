"""scripts/prune_results.py's bookkeeping: the grid of each model and the row cache seeded from the
committed results.json (no pruning here: fast)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prune_results.py"


@pytest.fixture(scope="module")
def pr():
    spec = importlib.util.spec_from_file_location("prune_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _published(pr, tmp_path: Path, rows: list[tuple[str, dict]], demo=None) -> Path:
    out = []
    for model, r in rows:
        k = pr.key(r, model, 128, 256)
        out.append(dict(key=k, model=model, perplexity=40.0, **r))
    f = tmp_path / "results.json"
    meta = {"demo": demo} if demo else {}
    f.write_text(json.dumps(dict(meta=meta, rows=out)))
    return f


def test_seed_cache_stores_only_missing_grid_rows(pr, tmp_path):
    grid = pr.runs("kjv-mamba-tiny", [0.5], 150)
    a, b = grid[1], grid[2]
    stranger = dict(label="gone", method="magnitude", pattern="3:7")  # no longer in the grid
    pub = _published(
        pr, tmp_path, [("kjv-mamba-tiny", a), ("kjv-mamba-tiny", b), ("kjv-mamba-tiny", stranger)]
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    kept = pr.row_file(cache, pr.key(b, "kjv-mamba-tiny", 128, 256))
    kept.write_text('{"mine": 1}\n')  # a row run here wins over the published one
    keys = [pr.key(r, "kjv-mamba-tiny", 128, 256) for r in grid]
    assert pr.seed_cache(cache, pub, keys) == 1
    row = json.loads(pr.row_file(cache, keys[1]).read_text())
    assert row["label"] == a["label"] and row["perplexity"] == 40.0
    assert json.loads(kept.read_text()) == {"mine": 1}
    assert not pr.row_file(cache, pr.key(stranger, "kjv-mamba-tiny", 128, 256)).exists()
    assert pr.seed_cache(cache, pub, keys) == 0  # idempotent
    assert pr.seed_cache(cache, tmp_path / "absent.json", keys) == 0


def test_seed_cache_restores_demo_timings(pr, tmp_path):
    demo = [dict(commit="abc", wall_seconds=37.5, cpu_seconds=37.8, load_before=0.5, load_after=0.7)]
    pub = _published(pr, tmp_path, [], demo=demo)
    pr.seed_cache(tmp_path, pub, [])
    assert json.loads((tmp_path / "demo.json").read_text()) == demo


def test_mamba2_grid(pr):
    grid = pr.runs(pr.MAMBA2, [0.5, 0.7], 150)
    have = {(r["label"], r.get("sparsity", 0.5)) for r in grid}
    want = {("dense", 0.5), ("sparsegpt 2:4", 0.5), ("sparsegpt 4:8", 0.5), ("wanda 2:4", 0.5)}
    want |= {
        (lb, s)
        for lb in (
            "magnitude unstructured",
            "wanda unstructured",
            "sparsegpt unstructured",
            pr.ALLOC,
            "C_4^n learned (150 steps)",
        )
        for s in (0.5, 0.7)
    }
    assert want <= have
    base = {x for x in have if not x[0].endswith(pr.REC) and x[0] != "dense"}
    assert {(lb + pr.REC, s) for lb, s in base} == have - base - {("dense", 0.5)}
    assert not any(r.get("packed") for r in grid)
    keys = [pr.key(r, pr.MAMBA2, 128, 256) for r in grid]
    assert len(set(keys)) == len(keys)


def test_learned_rows_of_an_older_learning_are_not_reused(pr, tmp_path):
    old = dict(label="C_4^n learned (150 steps)", method="c4", pattern="c4", sparsity=0.5, steps=150)
    pub = _published(pr, tmp_path, [("kjv-mamba-tiny", old)])
    grid = pr.runs("kjv-mamba-tiny", [0.5], 150)
    learned = [r for r in grid if r.get("steps")]
    assert learned and all(r["learn_rev"] == pr.LEARN for r in learned)
    keys = [pr.key(r, "kjv-mamba-tiny", 128, 256) for r in grid]
    assert pr.seed_cache(tmp_path, pub, keys) == 0
