"""bench/kernels.py: an entry's % of the read probe is paired by round (its rate ÷ the probe taken right
before it, the median over rounds), so that a machine whose read rate jumps between levels from one
round to the next does not move it; several products together weigh each by its bytes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kernels  # noqa: E402


def test_a_kernel_that_follows_the_machine_reads_the_same_share_of_the_probe_in_every_round():
    # the machine reads 19 GB/s, then 14.5, then 19: the kernel always reads 90% of it
    probes = [19.0, 14.5, 19.0]
    nbytes = 10**8
    times = [nbytes / (0.9 * p * 1e9) for p in probes]
    assert kernels.paired_pct([(nbytes, times, probes)]) == pytest.approx(90.0)
    # against the median of the run's probes the same kernel would read 90% in two rounds, 69% in one,
    # and a probe from the other spell could put it above 100%
    assert 100 * nbytes / times[1] / 1e9 / 19.0 == pytest.approx(68.7, abs=0.1)


def test_products_together_weigh_by_bytes_and_the_median_over_rounds_is_kept():
    # round 0: a big product at 100% and a small one at 50%; its bytes are 4x the small one's
    big, small = 4 * 10**8, 10**8
    p = [20.0, 20.0, 20.0]
    t_big = [big / 20e9, big / 20e9, big / 10e9]  # round 2: the big one read at half the probe
    t_small = [small / 10e9] * 3
    pct = kernels.paired_pct([(big, t_big, p), (small, t_small, p)])
    # rounds 0 and 1: the probe's time for both (5e8 / 20e9) ÷ their time (4e8/20e9 + 1e8/10e9) = 83.3%;
    # round 2: 25 ms ÷ 50 ms = 50%; the median is 83.3%
    assert pct == pytest.approx(100 * 0.025 / 0.030)


def test_every_product_needs_a_time_and_a_probe_for_every_round():
    with pytest.raises(ValueError, match="one time and one probe per round"):
        kernels.paired_pct([(10, [1.0, 1.0], [1.0])])
