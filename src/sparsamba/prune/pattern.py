"""Sparsity patterns of a linear weight: parse a spec, build keep-masks from scores, check and report.

Conventions (DESIGN.md §2), shapes in comments use these names:
    W          (out, in): a linear layer's weight; each row is one kernel (one dot product in the engine)
    group      M contiguous weights of one row along ``in``: M = 4 for C_4^n, M for N:M
    n_removed  C_4^n's n: weights REMOVED from every group of 4 (c4n1 keeps 3 of 4, c4n3 keeps 1 of 4)
    n_kept     weights KEPT in every group: 4 - n_removed for C_4^n, N for "N:M" (2:4 keeps 2 of 4 = c4n2)
    mask       bool, W's shape, True = kept

Padding. When ``in`` is not a multiple of M, the last group of each row has r < M real weights and
M - r virtual zeros after them. The virtual positions count as already removed: the last group keeps
min(r, n_kept) real weights (as many as the other groups when it can, all of them when it has fewer)
and never a virtual one. That is what the engine computes when it pads a row with zeros. Virtual
positions are not weights: no sparsity denominator counts them, so c4n2 on in = 10 keeps 2 + 2 + 2 of
the 10 weights of a row and is 40 % sparse, not 50 %. When M >= in the whole row is one group.

Zeros vs removed. A kept weight may be exactly zero, so a pruned W follows C_4^n when each group has
AT LEAST n zeros (virtual zeros included), i.e. at most 4 - n non-zeros, and follows N:M when each
group has AT MOST N non-zeros; never "exactly".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SparsambaError

_SPECS = (
    "use c4n1, c4n2 or c4n3 (n = weights removed from every group of 4), c4 (n learned per row), "
    "N:M with 0 < N < M (N weights kept in every M, e.g. 2:4 or 4:8), or unstructured"
)


@dataclass(frozen=True)
class Pattern:
    """A validated sparsity pattern; build it with ``parse_pattern``. ``str(p)`` is the canonical spec."""

    kind: str  # 'c4n' | 'c4' | 'nm' | 'unstructured'
    group: int | None = None  # M, weights per group along `in`: 4 for c4n / c4, M for N:M; None unstructured
    n_kept: int | None = None  # kept per group: 4 - n for c4n, N for N:M; None for c4 (per row), unstructured

    def __post_init__(self) -> None:
        g, k = self.group, self.n_kept
        ok = {
            "c4n": g == 4 and k in (1, 2, 3),
            "c4": g == 4 and k is None,
            "nm": isinstance(g, int) and isinstance(k, int) and 0 < k < g,
            "unstructured": g is None and k is None,
        }.get(self.kind, False)
        if not ok:
            raise SparsambaError(
                f"invalid Pattern{(self.kind, g, k)}: build it with parse_pattern(spec); {_SPECS}"
            )

    @property
    def n_removed(self) -> int | None:
        """Weights removed from every group (C_4^n's n); None where it is not fixed (c4, unstructured)."""
        return None if self.n_kept is None else self.group - self.n_kept

    def __str__(self) -> str:
        if self.kind == "c4n":
            return f"c4n{self.n_removed}"
        if self.kind == "nm":
            return f"{self.n_kept}:{self.group}"
        return self.kind


def parse_pattern(spec: str | Pattern) -> Pattern:
    """'c4n1' | 'c4n2' | 'c4n3' | 'c4' | 'N:M' | 'unstructured' (case and spaces ignored) -> Pattern."""
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise SparsambaError(
            f"a pattern spec is a string such as 'c4n2', got {type(spec).__name__}: {_SPECS}"
        )
    s = spec.strip().lower()
    if s in ("unstructured", "c4"):
        return Pattern(s, 4 if s == "c4" else None)
    if m := re.fullmatch(r"c4n([0-9]+)", s):
        n = int(m[1])
        if n == 0:
            raise SparsambaError(
                f"pattern {spec!r} removes nothing (every row dense): leave the layer out of pruning, "
                "or use 'c4' to let each row choose its n"
            )
        if n >= 4:
            raise SparsambaError(
                f"pattern {spec!r}: n counts the weights removed from each group of 4, so c4n{n} would "
                "remove every weight; use c4n1, c4n2 or c4n3 (or 'c4', where single rows may drop out)"
            )
        return Pattern("c4n", 4, 4 - n)
    if m := re.fullmatch(r"([0-9]+)\s*:\s*([0-9]+)", s):
        n_kept, group = int(m[1]), int(m[2])
        if not 0 < n_kept < group:
            raise SparsambaError(
                f"pattern {spec!r}: N:M keeps N non-zero weights in every M and needs 0 < N < M "
                "(2:4 keeps 2 of 4, the same as c4n2; 4:8 keeps 4 of 8)"
            )
        return Pattern("nm", group, n_kept)
    raise SparsambaError(f"unknown pattern spec {spec!r}: {_SPECS}")


# ---------------------------------------------------------------------------------------------------
# masks


def mask_from_scores(
    scores: Tensor,
    pattern: Pattern,
    sparsity: float | None = None,
    n_removed: Tensor | None = None,
    *,
    per_row: bool = True,
) -> Tensor:
    """Keep-mask (out, in), True = kept, of the highest ``scores`` (out, in) under ``pattern``.

    c4n, nm: the n_kept highest scores of every group (padding: see the module docstring).
    c4: the 4 - n_removed[r] highest of every group of row r; n_removed (out,) integers in 0..4.
    unstructured: removes the floor(sparsity · in) lowest scores of every row (Wanda's per-output
    comparison group), or with per_row=False the floor(sparsity · out · in) lowest of the whole layer.
    Ties keep the lower column (the lower flat index for a whole layer), so masks are deterministic.
    """
    s = _matrix(scores, "scores", allow_nan=False)
    _need_pattern(pattern)
    out, n_in = s.shape
    if pattern.kind != "unstructured":
        if sparsity is not None:
            raise SparsambaError(
                f"sparsity={sparsity} given with pattern {pattern}, which sets the sparsity itself: "
                "pass sparsity only with 'unstructured'"
            )
        if not per_row:
            raise SparsambaError(f"per_row=False applies to 'unstructured' only, not to pattern {pattern}")
    if pattern.kind == "c4":
        k = 4 - _n_removed_rows(n_removed, out).to(s.device).view(out, 1, 1)  # (out, 1, 1)
    elif n_removed is not None:
        raise SparsambaError(f"n_removed (one n per row) is for pattern 'c4' only; {pattern} fixes n itself")
    else:
        k = pattern.n_kept

    if pattern.kind == "unstructured":
        if sparsity is None:
            raise SparsambaError(
                "pattern 'unstructured' needs sparsity, the fraction of weights to remove, in [0, 1]"
            )
        rows = s if per_row else s.reshape(1, -1)  # the comparison groups: rows, or the whole layer
        width = rows.shape[1]
        rank, _ = _group_ranks(rows, width)  # (rows, 1, width)
        return (rank < width - _n_to_remove(sparsity, width)).view(out, n_in)

    rank, real = _group_ranks(s, pattern.group)  # (out, g, m)
    return _ungroup((rank < k) & real, n_in)


def group_masks(scores: Tensor) -> Tensor:
    """(5, out, in) bool: [n] is the C_4^n keep-mask of every row, keeping the 4 - n highest of each group.

    The masks M_n of sparse learning; [n] equals mask_from_scores(scores, c4n{n}) for n = 1..3, [0] keeps
    every weight, [4] none, and they are nested: [n + 1] ⊆ [n].
    """
    s = _matrix(scores, "scores", allow_nan=False)
    rank, real = _group_ranks(s, 4)  # (out, g, m)
    k = 4 - torch.arange(5, device=s.device).view(5, 1, 1, 1)
    keep = (rank < k) & real  # (5, out, g, m)
    return keep.reshape(5, s.shape[0], -1)[:, :, : s.shape[1]]


def _group_ranks(s: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Rank of every score within its group, 0 = highest, ties to the lower column: (out, g, m) each,
    with m = min(group, in), and whether each position is a real weight (False on padding)."""
    out, n_in = s.shape
    m = min(group, n_in)  # when M >= in the row is one group: padding it out to M would change nothing
    pad = -n_in % m
    if not s.is_floating_point():
        s = s.double()
    # padding scores -inf and sits after the real columns, so the stable sort ranks it after any real
    # weight, a real -inf included
    s = torch.cat([s, s.new_full((out, pad), -math.inf)], dim=1).view(out, -1, m)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(m, device=s.device).expand_as(order))
    real = torch.arange(n_in + pad, device=s.device).view(1, -1, m) < n_in  # (1, g, m)
    return rank, real


def _ungroup(x: Tensor, n_in: int) -> Tensor:
    """(out, g, m) -> (out, in), dropping the padding."""
    return x.reshape(x.shape[0], -1)[:, :n_in]


def _group_nonzeros(W: Tensor, group: int) -> Tensor:
    """Non-zero weights in each group, (out, g); virtual padding is zero and adds nothing."""
    out, n_in = W.shape
    m = min(group, n_in)
    nz = torch.cat([W != 0, W.new_zeros((out, -n_in % m), dtype=torch.bool)], dim=1)
    return nz.view(out, -1, m).sum(-1)


# ---------------------------------------------------------------------------------------------------
# checks


def removed_per_row(W: Tensor) -> Tensor:
    """C_4^n's n of every row of a dense-with-zeros W (out, in) -> (out,) int64.

    The largest n the row follows, 4 - (most non-zeros in any group of 4): it recovers the n a row was
    pruned with unless every group of the row also holds a kept weight equal to zero (or in < 4, where
    the virtual zeros of the only group already count: a dense row of in = 3 reads as n = 1).
    """
    W = _matrix(W, "W", allow_nan=True)
    return 4 - _group_nonzeros(W, 4).amax(dim=1)


def check_pattern(
    W: Tensor, pattern: Pattern, n_removed: Tensor | None = None, *, name: str = "weight"
) -> None:
    """Raise SparsambaError, naming layer ``name`` and its first offending row and group, unless W
    (out, in) follows ``pattern``.

    C_4^n: at least n zeros in every group of 4 (virtual padding zeros count), so a kept weight that is
    zero is fine. N:M: at most N non-zeros in every group of M. c4 with n_removed (out,): row r follows
    C_4^{n_removed[r]}. c4 without n_removed: always passes, since every row follows C_4^n for
    n = removed_per_row(W)[r] (the one n across all of its groups that the packer will use). unstructured:
    always passes.
    """
    W = _matrix(W, f"{name}: W", allow_nan=True)
    _need_pattern(pattern)
    out, n_in = W.shape
    if pattern.kind != "c4" and n_removed is not None:
        raise SparsambaError(f"{name}: n_removed (one n per row) is for pattern 'c4' only, not {pattern}")
    if pattern.kind == "unstructured" or (pattern.kind == "c4" and n_removed is None):
        return
    if pattern.kind == "c4":
        k = 4 - _n_removed_rows(n_removed, out, name).to(W.device).view(out, 1)  # (out, 1)
    else:
        k = pattern.n_kept
    nnz = _group_nonzeros(W, pattern.group)  # (out, g)
    bad = nnz > k
    if not bad.any():
        return
    first = int(bad.reshape(-1).nonzero()[0])
    r, g = divmod(first, nnz.shape[1])
    m = min(pattern.group, n_in)
    c0, c1 = g * m, min(g * m + m, n_in)
    kr = int(k[r]) if isinstance(k, Tensor) else k
    most = f"at most {kr} non-zero{'s' if kr != 1 else ''}"
    if pattern.kind == "nm":
        rule = f"{pattern} allows {most} in every group of {pattern.group}"
    else:
        rule = (
            f"n = {4 - kr} needs at least {4 - kr} zero{'s' if kr != 3 else ''} ({most}) in every group of 4"
        )
    raise SparsambaError(
        f"{name} ({out}x{n_in}) does not follow {pattern}: row {r}, group {g} (columns {c0}..{c1 - 1}) has "
        f"{int(nnz[r, g])} non-zeros, but {rule} ({int(bad.sum())} groups offend in all). Apply "
        "mask_from_scores(scores, pattern) to the weight first, or pass the pattern it was pruned with"
    )


# ---------------------------------------------------------------------------------------------------
# reports (sparsity.json)


@dataclass(frozen=True)
class LayerReport:
    """Measured sparsity of one pruned layer."""

    name: str
    pattern: str  # the canonical spec the layer was pruned to
    out_features: int
    in_features: int
    zeros: int  # exact zeros in W; a kept weight that happens to be 0 counts too
    weights: int  # out * in, the denominator: padding to whole groups is not counted
    sparsity: float  # zeros / weights, measured
    n_hist: tuple[int, ...] | None  # rows with n = 0..4 (removed_per_row) for groups of 4, else None

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "out": self.out_features,
            "in": self.in_features,
            "zeros": self.zeros,
            "weights": self.weights,
            "sparsity": self.sparsity,
            "n_hist": None if self.n_hist is None else list(self.n_hist),
        }


def layer_report(name: str, W: Tensor, pattern: Pattern) -> LayerReport:
    """Count the zeros of a pruned W (out, in); the n histogram for patterns of groups of 4 (c4n, c4, N:4)."""
    W = _matrix(W, f"{name}: W", allow_nan=True)
    _need_pattern(pattern)
    zeros = int((W == 0).sum())
    n_hist = None
    if pattern.group == 4:
        n_hist = tuple(torch.bincount(removed_per_row(W), minlength=5).tolist())
    return LayerReport(
        name, str(pattern), W.shape[0], W.shape[1], zeros, W.numel(), zeros / W.numel(), n_hist
    )


def model_report(reports: Iterable[LayerReport]) -> dict:
    """JSON-able {"version", "layers": {name: counts}, "total": counts over the prunable layers}."""
    reports = list(reports)
    if not reports:
        raise SparsambaError("no prunable layer to report: check which layers the pruner selected")
    layers = {}
    for r in reports:
        if r.name in layers:
            raise SparsambaError(f"layer {r.name!r} is reported twice: give every layer one report")
        layers[r.name] = r.to_dict()
    zeros, weights = sum(r.zeros for r in reports), sum(r.weights for r in reports)
    total = {
        "layers": len(reports),
        "zeros": zeros,
        "weights": weights,
        "sparsity": zeros / weights,
        "denominator": (
            f"sum of out*in over the {len(reports)} prunable layers listed in 'layers' ({weights} weights); "
            "layers not listed (embeddings, LM head, conv1d, A_log, D, norms) and the padding of rows to "
            "whole groups are not counted"
        ),
    }
    if all(r.n_hist is not None for r in reports):
        total["n_hist"] = [sum(c) for c in zip(*(r.n_hist for r in reports))]
    return {"version": 1, "layers": layers, "total": total}


# ---------------------------------------------------------------------------------------------------
# argument checks


def _need_pattern(pattern: object) -> None:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern (parse_pattern(spec)), got {type(pattern).__name__}")


def _matrix(t: object, what: str, allow_nan: bool) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim != 2 or t.numel() == 0:
        desc = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise SparsambaError(f"{what} must be a non-empty 2-D tensor (out, in), got {desc}")
    if not allow_nan and t.is_floating_point() and torch.isnan(t).any():
        raise SparsambaError(f"{what} contain NaN: check the calibration statistics they were computed from")
    return t


def _n_removed_rows(n_removed: Tensor | None, out: int, name: str = "") -> Tensor:
    where = f"{name}: " if name else ""
    if n_removed is None:
        raise SparsambaError(
            f"{where}pattern 'c4' learns n per row: pass n_removed, an integer tensor ({out},) "
            "of the weights removed from every group of 4 (0..4)"
        )
    if (
        not isinstance(n_removed, Tensor)
        or tuple(n_removed.shape) != (out,)
        or n_removed.is_floating_point()
        or n_removed.is_complex()
        or n_removed.dtype == torch.bool
    ):
        desc = f"{n_removed.dtype} {tuple(n_removed.shape)}" if isinstance(n_removed, Tensor) else n_removed
        raise SparsambaError(
            f"{where}n_removed must be an integer tensor of shape ({out},), one n per row; got {desc}"
        )
    bad = (n_removed < 0) | (n_removed > 4)
    if bad.any():
        r = int(bad.nonzero()[0])
        raise SparsambaError(
            f"{where}n_removed[{r}] = {int(n_removed[r])}: n counts the weights removed from a group of 4, "
            "so 0 <= n <= 4"
        )
    return n_removed.long()


def check_sparsity(sparsity: float) -> float:
    """The layer functions' argument check (mask_from_scores, sparsegpt_prune): a fraction of one
    layer's weights, in [0, 1]. A prune run's target is checked by PruneConfig, in [0, 1)."""
    s = float(sparsity)
    if not 0.0 <= s <= 1.0:  # False for NaN too
        raise SparsambaError(
            f"sparsity {sparsity} is the fraction of weights to remove: give a number in [0, 1]"
        )
    return s


def _n_to_remove(sparsity: float, count: int) -> int:
    """floor(sparsity · count), as Wanda's int(in · s); rounded first so 0.29 · 100 gives 29, not 28."""
    return math.floor(round(check_sparsity(sparsity) * count, 6))
