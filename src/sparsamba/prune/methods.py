"""The pruning methods, as one table: name -> how a layer's mask (and new weights) are chosen.

    magnitude / wanda    mask from |W| or |W|·‖X_j‖ under the pattern (optionally compensated)
    sparsegpt            blocked OBS with its own error feedback (unstructured, N:M, c4n*)
    c4                   C_4^n: fixed n (pattern c4n1/2/3) or n chosen per row (pattern c4) toward a
                         sparsity / latency / loss-budget target: every row priced at every n from the
                         dense model (cost F_r·e_r(n), alloc.py), allocated, then learned (learn.py);
                         masks by SparseGPT's selection, kept weights compensated (docs/DESIGN.md §5)
                         unless compensate=False

Every method is ``select(W, st, pattern, cfg, plan) -> (mask, Ŵ or None)``: W (out, in) the weight to
approximate (the layer's own, or W*, the one that gives the dense model's outputs on the pruned inputs
when ``cfg.dense_target``: dense_target.py), ``st`` its input statistics as the walker sees them (after the layers pruned before it),
``plan`` what the method's ``plan`` step fixed for this layer before the walk (c4: the dense model's
statistics and the learned n per row; None for the others). Ŵ None means "apply the mask", and the
walker re-solves the kept weights when compensation is on. The numerics live in scores.py,
sparsegpt.py, compensate.py, alloc.py and learn.py; this file only says which of them each method uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import alloc
from . import scores as S
from .calibrate import BlockWalker, LayerStats, output_fisher
from .learn import fixup, learn_logits, start_logits
from .pattern import Pattern, mask_from_scores, parse_pattern
from .sparsegpt import sparsegpt

if TYPE_CHECKING:
    from .config import PruneConfig

C4 = parse_pattern("c4")

# score name -> (W (out, in), stats, damp) -> scores (out, in), higher = kept first
SCORES: dict[str, Callable[[torch.Tensor, LayerStats, float], torch.Tensor]] = {
    "obs": lambda W, st, damp: S.obs_saliency(W, st.H, damp),
    "wanda": lambda W, st, damp: S.wanda(W, st.x_norm.to(W.dtype)),
    "magnitude": lambda W, st, damp: S.magnitude(W),
}


@dataclass
class LayerPlan:
    """What a method fixes for one layer before the walk."""

    dense: LayerStats  # the layer's input statistics in the dense model
    n_removed: torch.Tensor | None  # (out,) n per row (pattern c4), or None where the pattern fixes n


Select = Callable[
    [torch.Tensor, LayerStats, Pattern, "PruneConfig", "LayerPlan | None"],
    tuple[torch.Tensor, "torch.Tensor | None"],
]


@dataclass(frozen=True)
class Method:
    select: Select
    compensate: bool = False  # the default of cfg.compensate
    plan: Callable[..., dict[str, LayerPlan]] | None = None  # run once before the walk


def _mask(scores: torch.Tensor, pattern: Pattern, cfg: PruneConfig, n_removed=None) -> torch.Tensor:
    sparsity = cfg.sparsity if pattern.kind == "unstructured" else None
    return mask_from_scores(scores, pattern, sparsity=sparsity, n_removed=n_removed)


def _by_score(score: str) -> Select:
    def select(W, st, pattern, cfg, plan):
        return _mask(SCORES[score](W, st, cfg.damp), pattern, cfg), None

    return select


def _select_sparsegpt(W, st, pattern, cfg, plan):
    sparsity = cfg.sparsity if pattern.kind == "unstructured" else None
    new, mask = sparsegpt(W, st.H, pattern, sparsity=sparsity, damp=cfg.damp)
    return mask, new


def _select_c4(W, st, pattern, cfg, plan):
    if cfg.select == "sparsegpt":
        # SparseGPT's sequential OBS selection (each choice sees the updates of the previous
        # columns), then the kept weights re-solved all together
        n = plan.n_removed
        if n is None:
            n = torch.full((W.shape[0],), pattern.n_removed, device=W.device)
        return sparsegpt(W, st.H, C4, n_removed_per_row=n, damp=cfg.damp)[1], None
    return _mask(SCORES[cfg.score](W, plan.dense, cfg.damp), pattern, cfg, plan.n_removed), None


def _plan_c4(model, windows, layers, pattern, cfg, progress, log, timings, notes) -> dict[str, LayerPlan]:
    """Scores come from the dense model: one walk without pruning; for pattern c4 the same walk
    prices every row at every n, and the allocation (and learning) choose n per row."""
    from ..progress import progress as progress_bar

    t = time.time()
    dense: dict[str, LayerStats] = {}
    curves: dict[str, RowCurves] = {}
    walker = BlockWalker(model, windows)
    for b, block in enumerate(
        progress_bar(layers, desc="calibrate (dense)", unit="blocks", enabled=progress)
    ):
        st = walker.stats(b, block)
        dense.update(st)
        if pattern.kind == "c4":
            for name, mod in block:
                curves[name] = _row_curves(mod.weight.detach(), st[name].H, b, cfg)
        walker.advance(b)
    timings["calibrate_dense_s"] = time.time() - t
    n_removed: dict[str, torch.Tensor] = {}
    if pattern.kind == "c4":
        t = time.time()
        n_removed = _choose_n(model, windows, layers, curves, cfg, progress, log, notes)
        timings["allocate_learn_s"] = time.time() - t
    return {name: LayerPlan(dense[name], n_removed.get(name)) for block in layers for name, _ in block}


METHODS: dict[str, Method] = {
    "magnitude": Method(_by_score("magnitude")),
    "wanda": Method(_by_score("wanda")),
    "sparsegpt": Method(_select_sparsegpt),
    "c4": Method(_select_c4, compensate=True, plan=_plan_c4),
}


# ---------------------------------------------------------------------------------------------------
# c4's learned structure (docs/DESIGN.md §4): targets in, n per row out; the algorithm is learn.py's


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy on the calibration windows (the effectiveness loss's L)."""
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        lg = logits_of(model, w)[:, :-1].float()
        tot += F.cross_entropy(lg.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    return tot / n


@dataclass
class RowCurves:
    """One layer's rows priced at every n (alloc.py), from the dense model."""

    block: int
    err: (
        torch.Tensor
    )  # (out, 5) float64 e_r(n): output error of row r at n, kept weights as the walk leaves them
    removed: torch.Tensor  # (5,) float64: weights removed from one row at n
    cand: torch.Tensor | None  # (5, out, in) the rows' weights at each n, kept for learning / a loss budget


def _row_curves(W: torch.Tensor, H: torch.Tensor, block: int, cfg: PruneConfig) -> RowCurves:
    masks = alloc.c4_masks(W, H, cfg.damp)
    cand = alloc.compensated_weights(W, H, masks, cfg.compensate_damp) if cfg.compensating else W * masks
    removed = torch.tensor([float(W.shape[1] - masks[n, 0].sum()) for n in range(5)], dtype=torch.float64)
    keep = cfg.learn.steps > 0 or cfg.loss_budget is not None  # 5 copies of the weights: only if needed
    return RowCurves(block, alloc.row_errors(W, cand, H), removed, cand if keep else None)


def _choose_n(model, windows, layers, curves: dict[str, RowCurves], cfg: PruneConfig, progress, log, notes):
    """n per row toward the config's target: cost F_r·e_r(n), the allocation, then learning from it."""
    from .latency import row_costs

    mods = {name: mod for block in layers for name, mod in block}
    fisher = output_fisher(model, windows[: cfg.learn.fisher_windows], list(mods.items()), progress=progress)
    costs = {k: fisher[k][:, None] * c.err for k, c in curves.items()}
    if cfg.latency is not None:  # gain = latency saved per row at n; one budget over the model
        lat = {
            k: row_costs(cfg.latency_table, m.out_features, m.in_features).double() for k, m in mods.items()
        }
        gains = {k: v[0] - v for k, v in lat.items()}
        dense_lat = sum(float(v[0]) * mods[k].out_features for k, v in lat.items())
        most = sum(float(g[-1]) * mods[k].out_features for k, g in gains.items())
        fraction = min(max((dense_lat - cfg.latency) / most, 0.0), 1.0)
        groups, what = dict.fromkeys(mods, 0), "expected latency saved"
    else:
        gains = {k: c.removed for k, c in curves.items()}
        groups = {k: (c.block if cfg.scope == "block" else 0) for k, c in curves.items()}
        what = "expected sparsity"
        fraction = (
            cfg.sparsity
            if cfg.sparsity is not None
            else _loss_budget_sparsity(model, windows, mods, curves, costs, groups, cfg, log)
        )
    names = list(costs)
    ns, prices = alloc.allocate_scoped(
        [costs[k] for k in names],
        [gains[k][None] for k in names],
        [groups[k] for k in names],
        fraction,
        cfg.learn.row_block,
    )
    n0, price = dict(zip(names, ns)), dict(zip(names, prices))
    notes.update(steps=cfg.learn.steps, start="loss-aware allocation", target_fraction=round(fraction, 4))
    if cfg.learn.steps == 0:
        return n0
    logits = start_logits(costs, {k: g[None] for k, g in gains.items()}, n0, price, cfg.learn.confidence)
    diag = learn_logits(
        model,
        windows,
        mods,
        {k: c.cand for k, c in curves.items()},
        logits,
        gains,
        fraction,
        cfg.learn,
        what,
        progress,
        log,
    )
    n, moved = fixup(logits, gains, groups, fraction, cfg.learn.row_block)
    changed = sum(int((n[k] != n0[k]).sum()) for k in names) / sum(len(n0[k]) for k in names)
    notes.update(
        expected_before_fixup=diag["expected_after"],
        expected_at_start=diag["expected_before"],
        argmax_before_fixup=diag["argmax_after"],
        rows_moved_by_fixup=round(moved, 4),
        rows_changed_from_start=round(changed, 4),
    )
    log(f"fix-up moved {moved:.1%} of rows; {changed:.1%} of rows differ from the allocation")
    return n


def _loss_budget_sparsity(model, windows, mods, curves, costs, groups, cfg: PruneConfig, log) -> float:
    """The largest sparsity (bisection over allocations) whose effectiveness-loss ratio
    (L_sparse − L_dense)/L_dense on the calibration data stays ≤ the budget, each row at its
    candidate weights."""
    base = calibration_loss(model, windows)
    originals = {k: m.weight.detach().clone() for k, m in mods.items()}
    names = list(costs)

    def ratio_at(s: float) -> float:
        ns, _ = alloc.allocate_scoped(
            [costs[k] for k in names],
            [curves[k].removed[None] for k in names],
            [groups[k] for k in names],
            s,
            cfg.learn.row_block,
        )
        with torch.no_grad():
            for k, n in zip(names, ns):
                rows = torch.arange(len(n))
                mods[k].weight.copy_(curves[k].cand[n, rows].to(mods[k].weight.dtype))
            r = (calibration_loss(model, windows) - base) / base
            for k in names:
                mods[k].weight.copy_(originals[k])
        return r

    lo, hi = 0.0, 0.95
    for _ in range(8):
        mid = (lo + hi) / 2
        r = ratio_at(mid)
        log(f"loss budget: sparsity {mid:.3f} -> loss ratio {r:.4f}")
        lo, hi = (mid, hi) if r <= cfg.loss_budget else (lo, mid)
    return lo
