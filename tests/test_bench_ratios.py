"""bench/ratios.py: the two sides of a ratio run back to back in each round, the order alternating, and
the reported ratio is the median of the rounds' ratios (not a ratio of medians), marked against its
target. The engine runs are replaced by a fake timing that drifts from round to round."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ratios  # noqa: E402


def test_each_round_pairs_its_two_sides_and_the_median_of_the_ratios_is_reported(monkeypatch):
    calls = []
    weather = iter([1.0, 1.0, 0.5, 0.5, 1.2, 1.2])  # the machine's speed, shared by a round's two runs

    def fake_tg(path, threads, a):
        calls.append((path.name, threads))
        return {"dense": 50.0, "sparse": 70.0}[path.name] * next(weather)

    monkeypatch.setattr(ratios, "tg", fake_tg)
    p = dict(shape="130m", what="sparse ÷ dense", target=1.4, a=(Path("dense"), 1), b=(Path("sparse"), 1))

    class A:
        rounds = 3

    ratios.measure([p], A())
    # the order alternates: A then B, B then A, A then B
    assert calls == [("dense", 1), ("sparse", 1), ("sparse", 1), ("dense", 1), ("dense", 1), ("sparse", 1)]
    # every round's ratio is 1.4 whatever the weather; a ratio of the sides' medians would not be
    assert [round(r, 6) for r in p["ratios"]] == [1.4, 1.4, 1.4]
    md = ratios.markdown([p], dict(command="c", cpu="x", cores=2, commit="abc", date="d", rounds=3))
    assert "| 1.40× | 1.40–1.40 | ≥ 1.4× (met) |" in md


def test_a_ratio_below_its_target_is_marked_missed_and_one_without_a_target_is_not_judged():
    meta = dict(command="c", cpu="x", cores=2, commit="abc", date="d", rounds=2)
    low = dict(shape="370m", what="w", target=1.8, a_tps=[10, 10], b_tps=[15, 16], ratios=[1.5, 1.6])
    free = dict(shape="130m", what="w", target=None, a_tps=[10, 10], b_tps=[15, 16], ratios=[1.5, 1.6])
    md = ratios.markdown([low, free], meta)
    assert "| 1.55× | 1.50–1.60 | ≥ 1.8× (**missed**) |" in md
    assert "| 1.55× | 1.50–1.60 | – |" in md
