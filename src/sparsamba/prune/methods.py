"""The pruning methods, as one table: name -> how a layer's mask (and new weights) are chosen.

    magnitude / wanda    mask from |W| or |W|·‖X_j‖ under the pattern (optionally compensated)
    sparsegpt            blocked OBS with its own error feedback (unstructured, N:M, c4n*)
    c4                   C_4^n: fixed n (pattern c4n1/2/3) or n learned per row (pattern c4) toward a
                         sparsity / latency / loss-budget target; masks from the dense model's
                         statistics; kept weights compensated (DESIGN.md §5) unless compensate=False

Every method is ``select(W, st, pattern, cfg, plan) -> (mask, Ŵ or None)``: W (out, in) the layer's
weight, ``st`` its input statistics as the walker sees them (after the layers pruned before it),
``plan`` what the method's ``plan`` step fixed for this layer before the walk (c4: the dense model's
statistics and the learned n per row; None for the others). Ŵ None means "apply the mask", and the
walker re-solves the kept weights when compensation is on. The numerics live in scores.py,
sparsegpt.py, compensate.py and learn.py; this file only says which of them each method uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import scores as S
from .calibrate import BlockWalker, LayerStats
from .learn import LayerChoice, Target, fixup, learn_logits, make_choice
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


def _plan_c4(model, windows, layers, pattern, cfg, progress, log, timings) -> dict[str, LayerPlan]:
    """Scores come from the dense model: one walk without pruning; then, for pattern c4, n per row."""
    from tqdm import tqdm

    t = time.time()
    dense: dict[str, LayerStats] = {}
    walker = BlockWalker(model, windows)
    for b, block in enumerate(tqdm(layers, desc="calibrate (dense)", disable=not progress)):
        dense.update(walker.stats(b, block))
        walker.advance(b)
    timings["calibrate_dense_s"] = time.time() - t
    n_removed: dict[str, torch.Tensor] = {}
    if pattern.kind == "c4":
        t = time.time()
        n_removed = _learn_structure(model, windows, layers, dense, cfg, progress, log)
        timings["learn_s"] = time.time() - t
    return {name: LayerPlan(dense[name], n_removed.get(name)) for block in layers for name, _ in block}


METHODS: dict[str, Method] = {
    "magnitude": Method(_by_score("magnitude")),
    "wanda": Method(_by_score("wanda")),
    "sparsegpt": Method(_select_sparsegpt),
    "c4": Method(_select_c4, compensate=True, plan=_plan_c4),
}


# ---------------------------------------------------------------------------------------------------
# c4's learned structure (DESIGN.md §4): targets in, n per row out; the algorithm is learn.py's


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


def _latency_costs(choices: list[LayerChoice], table: dict) -> None:
    from .latency import row_costs

    for c in choices:
        c.cost = row_costs(table, c.out, c.module.in_features).to(c.module.weight.device)


def _learn_structure(
    model, windows, layers, dense_stats, cfg: PruneConfig, progress, log
) -> dict[str, torch.Tensor]:
    score = SCORES[cfg.score]
    choices = []
    for b, block in enumerate(layers):
        for name, mod in block:
            sc = score(mod.weight.detach(), dense_stats[name], cfg.damp)
            choices.append(make_choice(name, mod, b, sc))
    rb = cfg.learn.row_block
    if cfg.latency is not None:
        _latency_costs(choices, cfg.latency_table)
        target = Target("latency", cfg.latency)
        learn_logits(model, windows, choices, target, cfg.learn, progress, log)
        return fixup(choices, target, rb)
    if cfg.sparsity is not None:
        target = Target("sparsity", cfg.sparsity, cfg.scope)
        learn_logits(model, windows, choices, target, cfg.learn, progress, log)
        return fixup(choices, target, rb)
    # loss budget: learn the row ordering at 50%, then the largest sparsity (bisection over the
    # fix-up's exact targets) whose effectiveness-loss ratio on the calibration data stays ≤ R
    learn_logits(model, windows, choices, Target("sparsity", 0.5, cfg.scope), cfg.learn, progress, log)
    base = calibration_loss(model, windows)
    originals = {c.name: c.module.weight.detach().clone() for c in choices}

    def ratio_at(s: float) -> tuple[float, dict]:
        ns = fixup(choices, Target("sparsity", s, cfg.scope), rb)
        with torch.no_grad():
            for c in choices:
                sc = score(originals[c.name], dense_stats[c.name], cfg.damp)
                mask = mask_from_scores(sc, C4, n_removed=ns[c.name])
                c.module.weight.copy_(originals[c.name] * mask)
        r = (calibration_loss(model, windows) - base) / base
        with torch.no_grad():
            for c in choices:
                c.module.weight.copy_(originals[c.name])
        return r, ns

    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):
        mid = (lo + hi) / 2
        r, ns = ratio_at(mid)
        log(f"loss budget: sparsity {mid:.3f} -> loss ratio {r:.4f}")
        if r <= cfg.loss_budget:
            lo, best = mid, ns
        else:
            hi = mid
    if best is None:
        best = ratio_at(0.0)[1]
    return best
