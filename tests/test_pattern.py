"""Pattern specs, keep-masks against a brute-force loop, the pattern check and the sparsity report."""

import json
import math

import pytest
import torch

from sparsamba.errors import SparsambaError
from sparsamba.prune.pattern import (
    Pattern,
    check_pattern,
    group_masks,
    layer_report,
    mask_from_scores,
    model_report,
    parse_pattern,
    removed_per_row,
)

FIXED = ["c4n1", "c4n2", "c4n3", "2:4", "1:4", "4:8", "3:8"]
WIDTHS = [16, 10, 7, 3]  # whole groups, a partial last group of 2 and of 3, a row shorter than a group


def mask_ref(scores: torch.Tensor, group: int, n_kept: list[int]) -> torch.Tensor:
    """The spec, one weight at a time: in each group of `group` columns (the last may be short), keep
    the n_kept[r] highest scores, ties to the lower column."""
    out, n_in = scores.shape
    keep = torch.zeros(out, n_in, dtype=torch.bool)
    for r in range(out):
        for c0 in range(0, n_in, group):
            cols = sorted(range(c0, min(c0 + group, n_in)), key=lambda c: (-scores[r, c].item(), c))
            for c in cols[: n_kept[r]]:
                keep[r, c] = True
    return keep


def scores_with_ties(out: int, n_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (out, n_in), generator=g).float()  # few values: many ties


def scores_distinct(out: int, n_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=g).abs()


# ---------------------------------------------------------------------------------------------------
# specs


@pytest.mark.parametrize("spec", ["c4n1", "c4n2", "c4n3", "c4", "2:4", "4:8", "1:4", "7:16", "unstructured"])
def test_parse_round_trips(spec):
    p = parse_pattern(spec)
    assert str(p) == spec
    assert parse_pattern(str(p)) == p
    assert parse_pattern(p) is p


def test_parse_fields_name_removed_and_kept_apart():
    c4n1, c4n3, c4n2, two_four, four_eight = map(parse_pattern, ["c4n1", "c4n3", "c4n2", "2:4", "4:8"])
    assert (c4n1.kind, c4n1.group, c4n1.n_kept, c4n1.n_removed) == ("c4n", 4, 3, 1)
    assert (c4n3.n_kept, c4n3.n_removed) == (1, 3)
    assert (two_four.kind, two_four.group, two_four.n_kept, two_four.n_removed) == ("nm", 4, 2, 2)
    assert (c4n2.n_kept, c4n2.n_removed) == (two_four.n_kept, two_four.n_removed)
    assert (four_eight.group, four_eight.n_kept, four_eight.n_removed) == (8, 4, 4)
    c4, un = parse_pattern("c4"), parse_pattern("unstructured")
    assert (c4.kind, c4.group, c4.n_kept, c4.n_removed) == ("c4", 4, None, None)
    assert (un.kind, un.group, un.n_kept) == ("unstructured", None, None)
    assert str(parse_pattern("  C4N2 ")) == "c4n2" and str(parse_pattern("2 : 4")) == "2:4"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("c4n0", "removes nothing"),
        ("c4n4", "every weight"),
        ("c4n5", "removed from each group of 4"),
        ("4:4", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("5:4", "0 < N < M"),
        ("c8n2", "unknown pattern"),
        ("2-4", "unknown pattern"),
        ("2:4:8", "unknown pattern"),
        ("c4n", "unknown pattern"),
        ("dense", "unknown pattern"),
        ("", "unknown pattern"),
    ],
)
def test_parse_rejects_bad_specs(spec, words):
    with pytest.raises(SparsambaError, match=words) as e:
        parse_pattern(spec)
    assert repr(spec) in str(e.value)  # says which spec was wrong


def test_bad_pattern_objects_are_rejected():
    with pytest.raises(SparsambaError, match="parse_pattern"):
        Pattern("c4n", 4, 4)
    with pytest.raises(SparsambaError):
        Pattern("nm", 4, 5)
    with pytest.raises(SparsambaError):
        parse_pattern(24)
    with pytest.raises(TypeError, match="parse_pattern"):
        mask_from_scores(torch.ones(2, 4), "c4n2")


# ---------------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("spec", FIXED)
@pytest.mark.parametrize("n_in", WIDTHS)
@pytest.mark.parametrize("make", [scores_with_ties, scores_distinct])
def test_fixed_masks_keep_the_top_of_each_group(spec, n_in, make):
    p = parse_pattern(spec)
    s = make(6, n_in, seed=n_in)
    mask = mask_from_scores(s, p)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert torch.equal(mask, mask_ref(s, p.group, [p.n_kept] * 6))
    # exact counts: n_kept in every whole group, min(r, n_kept) in a last group of r real weights
    whole, r = divmod(n_in, p.group)
    counts = mask[:, : whole * p.group].reshape(6, whole, p.group).sum(-1)
    assert (counts == p.n_kept).all()
    if r:
        assert (mask[:, whole * p.group :].sum(-1) == min(r, p.n_kept)).all()


def test_kept_weights_score_at_least_the_removed_ones_of_their_group():
    s = scores_distinct(32, 64, seed=3)
    mask = mask_from_scores(s, parse_pattern("c4n3")).view(32, 16, 4)
    g = s.view(32, 16, 4)
    kept_min = torch.where(mask, g, torch.inf).amin(-1)
    removed_max = torch.where(mask, -torch.inf, g).amax(-1)
    assert (kept_min >= removed_max).all()


def test_ties_keep_the_lower_column():
    s = torch.ones(3, 10)
    assert mask_from_scores(s, parse_pattern("2:4"))[0].nonzero().view(-1).tolist() == [0, 1, 4, 5, 8, 9]
    assert mask_from_scores(s, parse_pattern("c4n3"))[0].nonzero().view(-1).tolist() == [0, 4, 8]
    assert torch.equal(mask_from_scores(s, parse_pattern("2:4")), mask_from_scores(s, parse_pattern("c4n2")))


def test_padding_is_never_kept_even_against_minus_infinity():
    s = torch.full((2, 7), -math.inf)  # the last group has 3 real weights, all -inf like the padding
    mask = mask_from_scores(s, parse_pattern("c4n1"))
    assert mask.shape == (2, 7) and mask.sum(1).tolist() == [6, 6]


@pytest.mark.parametrize("n_in", WIDTHS)
@pytest.mark.parametrize("make", [scores_with_ties, scores_distinct])
def test_c4_mask_follows_the_n_of_each_row(n_in, make):
    n_removed = torch.tensor([0, 1, 2, 3, 4, 0, 4, 2, 1, 3])
    s = make(10, n_in, seed=7 + n_in)
    mask = mask_from_scores(s, parse_pattern("c4"), n_removed=n_removed)
    assert torch.equal(mask, mask_ref(s, 4, (4 - n_removed).tolist()))
    assert mask[n_removed == 0].all() and not mask[n_removed == 4].any()
    whole = n_in // 4
    if whole:
        counts = mask[:, : whole * 4].reshape(10, whole, 4).sum(-1)
        assert torch.equal(counts, (4 - n_removed).view(10, 1).expand(10, whole))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.29, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("n_in", [10, 64, 100])
def test_unstructured_per_row_removes_the_lowest_of_each_row(sparsity, n_in):
    s = scores_with_ties(5, n_in, seed=n_in)
    mask = mask_from_scores(s, parse_pattern("unstructured"), sparsity)
    k_removed = math.floor(round(sparsity * n_in, 6))  # 0.29 * 100 = 28.999999999999996 -> 29
    assert (mask.sum(1) == n_in - k_removed).all()
    assert torch.equal(mask, mask_ref(s, n_in, [n_in - k_removed] * 5))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_unstructured_whole_layer(sparsity):
    s = scores_with_ties(6, 10, seed=1)
    mask = mask_from_scores(s, parse_pattern("unstructured"), sparsity, per_row=False)
    k_removed = math.floor(round(sparsity * 60, 6))
    assert int(mask.sum()) == 60 - k_removed
    ref = mask_ref(s.reshape(1, 60), 60, [60 - k_removed]).view(6, 10)  # ties to the lower flat index
    assert torch.equal(mask, ref)
    if 0 < sparsity < 1:  # rows differ: the comparison is over the layer, not each row
        s2 = s.clone()
        s2[0] += 100
        assert mask_from_scores(s2, parse_pattern("unstructured"), sparsity, per_row=False)[0].all()


def test_integer_scores_work():
    s = torch.tensor([[3, 1, 2, 0, 5, 5]])
    assert mask_from_scores(s, parse_pattern("c4n2")).tolist() == [[True, False, True, False, True, True]]


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(spec="unstructured"), "needs sparsity"),
        (dict(spec="unstructured", sparsity=1.5), r"in \[0, 1\]"),
        (dict(spec="unstructured", sparsity=-0.1), r"in \[0, 1\]"),
        (dict(spec="unstructured", sparsity=float("nan")), r"in \[0, 1\]"),
        (dict(spec="c4n2", sparsity=0.5), "only with 'unstructured'"),
        (dict(spec="c4n2", per_row=False), "'unstructured' only"),
        (dict(spec="c4"), "pass n_removed"),
        (dict(spec="c4", n_removed=torch.zeros(3, dtype=torch.long)), r"shape \(4,\)"),
        (dict(spec="c4", n_removed=torch.zeros(4)), "integer tensor"),
        (dict(spec="c4", n_removed=torch.tensor([0, 1, 5, 2])), r"n_removed\[2\] = 5"),
        (dict(spec="c4", n_removed=torch.tensor([0, -1, 3, 2])), r"n_removed\[1\] = -1"),
        (dict(spec="2:4", n_removed=torch.zeros(4, dtype=torch.long)), "'c4' only"),
    ],
)
def test_mask_argument_errors(kw, words):
    p = parse_pattern(kw.pop("spec"))
    with pytest.raises(SparsambaError, match=words):
        mask_from_scores(torch.rand(4, 8), p, **kw)


def test_bad_scores_are_rejected():
    with pytest.raises(SparsambaError, match="NaN"):
        mask_from_scores(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), parse_pattern("c4n2"))
    with pytest.raises(SparsambaError, match="2-D"):
        mask_from_scores(torch.rand(8), parse_pattern("c4n2"))
    with pytest.raises(SparsambaError, match="non-empty"):
        mask_from_scores(torch.rand(4, 0), parse_pattern("c4n2"))


@pytest.mark.parametrize("n_in", WIDTHS)
def test_group_masks_agree_with_mask_from_scores(n_in):
    s = scores_with_ties(9, n_in, seed=11)
    gm = group_masks(s)
    assert gm.shape == (5, 9, n_in) and gm.dtype == torch.bool
    assert gm[0].all() and not gm[4].any()
    for n in (1, 2, 3):
        assert torch.equal(gm[n], mask_from_scores(s, parse_pattern(f"c4n{n}")))
    assert (gm[1:] <= gm[:-1]).all()  # nested: removing one more never brings a weight back
    n_removed = torch.tensor([4, 3, 2, 1, 0, 1, 2, 3, 4])
    picked = gm[n_removed, torch.arange(9)]  # row r of M_{n_r}
    assert torch.equal(picked, mask_from_scores(s, parse_pattern("c4"), n_removed=n_removed))


# ---------------------------------------------------------------------------------------------------
# check and n per row


def masked_weight(spec: str, out: int, n_in: int, n_removed=None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n_in, generator=g)  # no accidental zeros
    return W * mask_from_scores(W.abs(), parse_pattern(spec), n_removed=n_removed)


@pytest.mark.parametrize("spec", FIXED)
@pytest.mark.parametrize("n_in", WIDTHS)
def test_check_accepts_masked_weights(spec, n_in):
    p = parse_pattern(spec)
    W = masked_weight(spec, 6, n_in)
    check_pattern(W, p, name="layers.0.in_proj")
    W[0, 0] = 0.0  # a kept weight that is exactly zero still follows the pattern
    check_pattern(W, p, name="layers.0.in_proj")


def test_check_rejects_and_names_layer_row_and_group():
    W = masked_weight("c4n2", 5, 16)
    W[2, 5] = W[2, 6] = W[2, 7] = W[2, 4] = 1.0  # row 2, group 1 (columns 4..7) made dense
    W[3, 12:16] = 1.0  # and a later offender
    with pytest.raises(SparsambaError) as e:
        check_pattern(W, parse_pattern("c4n2"), name="backbone.layers.3.mixer.out_proj")
    msg = str(e.value)
    assert "backbone.layers.3.mixer.out_proj" in msg and "row 2, group 1" in msg and "columns 4..7" in msg
    assert "4 non-zeros" in msg and "at least 2 zeros" in msg and "(2 groups offend in all)" in msg


def test_check_rejects_a_dense_weight_at_its_first_group():
    with pytest.raises(SparsambaError, match=r"row 0, group 0 .*\(12 groups offend in all\)"):
        check_pattern(torch.ones(3, 16), parse_pattern("c4n1"), name="x_proj")


def test_check_nm_counts_non_zeros_in_groups_of_m():
    W = torch.zeros(1, 8)
    W[0, [0, 1, 2, 4]] = 1.0  # 4 of 8, but 3 of the first 4
    check_pattern(W, parse_pattern("4:8"), name="l")
    with pytest.raises(SparsambaError, match=r"row 0, group 0 \(columns 0..3\) has 3 non-zeros"):
        check_pattern(W, parse_pattern("2:4"), name="l")
    W = masked_weight("4:8", 4, 20)  # groups of 8, 8, 4
    check_pattern(W, parse_pattern("4:8"), name="l")
    W[1, 16:20] = 1.0  # the last group of 4 real weights may keep all 4: still fine
    check_pattern(W, parse_pattern("4:8"), name="l")
    W[3, 8:16] = 1.0
    with pytest.raises(SparsambaError, match=r"row 3, group 1 \(columns 8..15\) has 8 non-zeros.*at most 4"):
        check_pattern(W, parse_pattern("4:8"), name="l")


def test_check_padding_counts_as_zeros():
    W = torch.ones(2, 10)
    W[:, [1, 2, 3, 5, 6, 7]] = 0  # three zeros in each whole group; the last group of 2 real is dense
    check_pattern(W, parse_pattern("c4n2"), name="l")  # its 2 virtual zeros are the ones removed
    with pytest.raises(SparsambaError, match=r"row 0, group 2 \(columns 8..9\) has 2 non-zeros"):
        check_pattern(W, parse_pattern("c4n3"), name="l")


def test_check_c4_against_the_n_of_each_row():
    n_removed = torch.tensor([0, 1, 2, 3, 4, 2])
    W = masked_weight("c4", 6, 10, n_removed=n_removed)
    check_pattern(W, parse_pattern("c4"), n_removed, name="dt_proj")
    check_pattern(W, parse_pattern("c4"), name="dt_proj")  # without n_removed every row follows its own n
    check_pattern(torch.ones(6, 10), parse_pattern("c4"), name="dt_proj")
    W[4, 9] = 0.5  # the n = 4 row gets a weight back
    with pytest.raises(SparsambaError, match=r"dt_proj .*row 4, group 2 .*n = 4 needs at least 4 zeros"):
        check_pattern(W, parse_pattern("c4"), n_removed, name="dt_proj")
    with pytest.raises(SparsambaError, match=r"dt_proj: n_removed\[1\] = 7"):
        check_pattern(W, parse_pattern("c4"), torch.tensor([0, 7, 0, 0, 0, 0]), name="dt_proj")


def test_check_unstructured_always_passes_and_n_removed_is_c4_only():
    check_pattern(torch.ones(3, 5), parse_pattern("unstructured"), name="l")
    with pytest.raises(SparsambaError, match="'c4' only"):
        check_pattern(torch.ones(3, 4), parse_pattern("c4n2"), torch.zeros(3, dtype=torch.long), name="l")


@pytest.mark.parametrize("n_in", [16, 10, 7])
def test_removed_per_row_recovers_n(n_in):
    n_removed = torch.tensor([0, 1, 2, 3, 4, 3, 2, 1, 0])
    W = masked_weight("c4", 9, n_in, n_removed=n_removed, seed=n_in)
    got = removed_per_row(W)
    assert got.dtype == torch.int64 and torch.equal(got, n_removed)


def test_removed_per_row_edge_cases():
    assert removed_per_row(torch.ones(1, 3)).tolist() == [1]  # the one group has a virtual zero
    W = torch.ones(2, 8)
    W[0, [0, 1, 4]] = 0  # groups with 2 and 1 zeros: the row follows c4n1, not c4n2
    assert removed_per_row(W).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------
# reports


def test_layer_report_counts():
    n_removed = torch.tensor([0, 1, 2, 3, 4, 2, 2, 1])
    W = masked_weight("c4", 8, 16, n_removed=n_removed)
    rep = layer_report("layers.0.mixer.in_proj", W, parse_pattern("c4"))
    assert (rep.out_features, rep.in_features, rep.weights) == (8, 16, 128)
    assert rep.zeros == int(n_removed.sum()) * 4
    assert rep.sparsity == rep.zeros / 128
    assert rep.n_hist == (1, 2, 3, 1, 1) and rep.pattern == "c4"


def test_layer_report_denominator_excludes_padding():
    rep = layer_report("x_proj", masked_weight("c4n2", 3, 10), parse_pattern("c4n2"))
    assert (rep.zeros, rep.weights, rep.sparsity) == (12, 30, 0.4)  # 2 + 2 + 0 removed per row of 10
    assert rep.n_hist == (0, 0, 3, 0, 0)
    rep = layer_report("u", masked_weight("4:8", 3, 16), parse_pattern("4:8"))
    assert rep.n_hist is None and rep.sparsity == 0.5


def test_model_report_is_json_and_totals_the_prunable_layers():
    a = layer_report("layers.0.mixer.in_proj", masked_weight("c4n2", 8, 16), parse_pattern("c4n2"))
    b = layer_report("layers.0.mixer.out_proj", masked_weight("c4n3", 4, 10), parse_pattern("c4n3"))
    rep = json.loads(json.dumps(model_report([a, b])))
    assert list(rep["layers"]) == [a.name, b.name]
    assert rep["layers"][b.name] == {
        "pattern": "c4n3",
        "out": 4,
        "in": 10,
        "zeros": 4 * 7,  # 3 + 3 + 1 of each row: the last group of 2 keeps min(2, 1) = 1
        "weights": 40,
        "sparsity": 0.7,
        "n_hist": [0, 0, 0, 4, 0],
    }
    t = rep["total"]
    assert (t["layers"], t["zeros"], t["weights"]) == (2, 64 + 28, 128 + 40)
    assert t["sparsity"] == pytest.approx(92 / 168) and "168 weights" in t["denominator"]
    assert t["n_hist"] == [0, 0, 8, 4, 0]
    u = layer_report("lm_head", masked_weight("2:8", 2, 8), parse_pattern("2:8"))
    assert "n_hist" not in model_report([a, u])["total"]


def test_model_report_errors():
    a = layer_report("l", torch.ones(2, 4), parse_pattern("c4n1"))
    with pytest.raises(SparsambaError, match="twice"):
        model_report([a, a])
    with pytest.raises(SparsambaError, match="no prunable layer"):
        model_report([])
