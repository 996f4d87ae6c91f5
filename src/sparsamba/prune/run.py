"""The pruning driver: one walk over the model's blocks for every method (the numerics live in
scores.py, sparsegpt.py, compensate.py and learn.py; this file only orders them).

    magnitude / wanda    mask from |W| or |W|·‖X_j‖ under the pattern (optionally compensated)
    sparsegpt            blocked OBS with its own error feedback (unstructured, N:M, c4n*)
    c4                   C_4^n: fixed n (pattern c4n1/2/3) or n learned per row (pattern c4) toward a
                         sparsity / latency / loss-budget target; masks from OBS saliency of the dense
                         model; kept weights compensated (DESIGN.md §5) unless compensate=False
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparsambaError
from . import scores as S
from .calibrate import BlockWalker, LayerStats, prunable_layers
from .compensate import compensate as compensate_weights
from .compensate import reconstruction_error
from .learn import LayerChoice, LearnConfig, Target, fixup, learn_logits, make_choice
from .pattern import Pattern, layer_report, mask_from_scores, model_report, parse_pattern
from .sparsegpt import sparsegpt

METHODS = ("magnitude", "wanda", "sparsegpt", "c4")


@dataclass
class PruneConfig:
    method: str = "c4"
    pattern: str = "c4"
    sparsity: float | None = None  # unstructured and c4 (learned); implied by fixed patterns
    scope: str = "block"  # c4 sparsity target: uniform per block ("block") or over the model ("global")
    latency: float | None = None  # c4: target latency, in the table's unit
    latency_table: dict | None = field(default=None, repr=False)
    loss_budget: float | None = None  # c4: max effectiveness-loss ratio (L_sparse − L_dense) / L_dense
    compensate: bool | None = None  # default: on for c4, off for magnitude / wanda (sparsegpt has its own)
    score: str = "obs"  # c4 masks: "obs" (W²/[H⁻¹]_jj), "wanda" or "magnitude"
    select: str = "sparsegpt"  # c4 masks chosen by SparseGPT's sequential OBS ("sparsegpt") or by score
    damp: float = 0.01  # SparseGPT's and the OBS score's damping
    compensate_damp: float = 0.001  # γ of compensation (the paper's ablation)
    include_lm_head: bool = False
    true_sequential: bool = (
        True  # gather each layer's statistics after the layers before it in its block are pruned
    )
    learn: LearnConfig = field(default_factory=LearnConfig)
    debug: bool = False

    def validate(self) -> Pattern:
        if self.method not in METHODS:
            raise SparsambaError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        p = parse_pattern(self.pattern)
        if p.kind == "c4" and self.method != "c4":
            raise SparsambaError(f"pattern 'c4' (n learned per row) needs --method c4, not {self.method}")
        if self.method == "c4" and p.kind not in ("c4", "c4n"):
            raise SparsambaError(f"method c4 takes pattern c4 (learned) or c4n1/c4n2/c4n3, not {p}")
        targets = [t for t in (self.sparsity, self.latency, self.loss_budget) if t is not None]
        if len(targets) > 1:
            raise SparsambaError("give one target: --sparsity, --latency or --loss-budget")
        if (
            self.sparsity is not None
            and not (0.0 <= self.sparsity < 1.0)
            or (self.sparsity is not None and math.isnan(self.sparsity))
        ):
            raise SparsambaError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if p.kind in ("c4n", "nm") and self.sparsity is not None:
            implied = 1 - p.n_kept / p.group
            if abs(self.sparsity - implied) > 1e-9:
                raise SparsambaError(
                    f"pattern {p} fixes sparsity at {implied:.0%}; drop --sparsity or use pattern "
                    f"{'c4' if self.method == 'c4' else 'unstructured'} to reach {self.sparsity:.0%}"
                )
        if p.kind == "unstructured" and self.sparsity is None:
            raise SparsambaError("pattern unstructured needs --sparsity")
        if p.kind == "c4" and not targets:
            raise SparsambaError(
                "pattern c4 needs a target: --sparsity S, --latency T with --latency-table, or --loss-budget R"
            )
        if p.kind != "c4" and (self.latency is not None or self.loss_budget is not None):
            raise SparsambaError(
                "--latency and --loss-budget need the learned pattern c4 (--method c4 --pattern c4)"
            )
        if self.latency is not None and self.latency_table is None:
            raise SparsambaError(
                "--latency needs --latency-table FILE (from `sparsamba profile` or the cost model)"
            )
        if self.loss_budget is not None and not self.loss_budget > 0:
            raise SparsambaError(f"--loss-budget must be a positive ratio, got {self.loss_budget}")
        if self.score not in ("obs", "wanda", "magnitude"):
            raise SparsambaError(f"unknown score {self.score!r}; use obs, wanda or magnitude")
        if self.scope not in ("block", "global"):
            raise SparsambaError(f"unknown scope {self.scope!r}; use block or global")
        return p


def _score(kind: str, W: torch.Tensor, st: LayerStats, damp: float) -> torch.Tensor:
    if kind == "magnitude":
        return S.magnitude(W)
    if kind == "wanda":
        return S.wanda(W, st.x_norm.to(W.dtype))
    return S.obs_saliency(W, st.H, damp)


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
    choices = []
    for b, block in enumerate(layers):
        for name, mod in block:
            sc = _score(cfg.score, mod.weight.detach(), dense_stats[name], cfg.damp)
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
                sc = _score(cfg.score, originals[c.name], dense_stats[c.name], cfg.damp)
                mask = mask_from_scores(sc, parse_pattern("c4"), n_removed=ns[c.name])
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


def prune_model(
    model: nn.Module, windows: torch.Tensor, cfg: PruneConfig, progress: bool = True, log=print
) -> dict:
    """Prune ``model`` in place with calibration ``windows`` (n, seqlen); returns the report that
    becomes ``sparsity.json``."""
    from tqdm import tqdm

    pattern = cfg.validate()
    t0 = time.time()
    layers = prunable_layers(model, cfg.include_lm_head)
    for block in layers:
        for name, mod in block:
            if not torch.isfinite(mod.weight).all():
                raise SparsambaError(
                    f"{name}: the weight holds NaN or inf; the model is broken, nothing was pruned"
                )
    compensate = cfg.compensate if cfg.compensate is not None else cfg.method == "c4"
    n_removed: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}
    dense_stats: dict[str, LayerStats] = {}

    if cfg.method == "c4":
        # scores come from the dense model: one walk without pruning
        t = time.time()
        walker = BlockWalker(model, windows)
        for b, block in enumerate(tqdm(layers, desc="calibrate (dense)", disable=not progress)):
            dense_stats.update(walker.stats(b, block))
            walker.advance(b)
        timings["calibrate_dense_s"] = time.time() - t
        if pattern.kind == "c4":
            t = time.time()
            n_removed = _learn_structure(model, windows, layers, dense_stats, cfg, progress, log)
            timings["learn_s"] = time.time() - t

    t = time.time()
    walker = BlockWalker(model, windows)
    errors = {}
    for b, block in enumerate(
        tqdm(layers, desc="prune" + (" + compensate" if compensate else ""), disable=not progress)
    ):
        stats = walker.stats(b, block) if not cfg.true_sequential else {}
        for name, mod in block:
            if cfg.true_sequential:  # this layer's inputs as produced by the already pruned layers before it
                stats.update(walker.stats(b, [(name, mod)]))
            W = mod.weight.detach()
            st = stats[name]
            if cfg.method == "sparsegpt":
                new, _ = sparsegpt(W, st.H, str(pattern), sparsity=cfg.sparsity, damp=cfg.damp)
            else:
                score_kind = {"magnitude": "magnitude", "wanda": "wanda"}.get(cfg.method, cfg.score)
                sc = _score(score_kind, W, dense_stats.get(name, st), cfg.damp)
                if cfg.method == "c4" and cfg.select == "sparsegpt":
                    # SparseGPT's sequential OBS selection (each choice sees the updates of the
                    # previous columns), then the kept weights re-solved all together
                    n = (
                        n_removed[name]
                        if pattern.kind == "c4"
                        else torch.full((W.shape[0],), 4 - pattern.n_kept, device=W.device)
                    )
                    _, mask = sparsegpt(W, st.H, "c4", n_removed_per_row=n, damp=cfg.damp)
                elif pattern.kind == "c4":
                    mask = mask_from_scores(sc, pattern, n_removed=n_removed[name])
                elif pattern.kind == "unstructured":
                    mask = mask_from_scores(sc, pattern, sparsity=cfg.sparsity)
                else:
                    mask = mask_from_scores(sc, pattern)
                new = W * mask
                if compensate:
                    new = compensate_weights(
                        W, st.H, mask, damp=cfg.compensate_damp, debug=cfg.debug, name=name
                    )
            errors[name] = reconstruction_error(W, new, st.H)
            if cfg.debug and not compensate:  # compensate prints its own before / after line
                log(f"{name}: relative reconstruction error {errors[name]:.4e}")
            with torch.no_grad():
                mod.weight.copy_(new.to(mod.weight.dtype))
        walker.advance(b)
    timings["prune_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    reports = [layer_report(n, m.weight.detach(), pattern) for block in layers for n, m in block]
    rep = model_report(reports)
    rep.update(
        method=cfg.method,
        pattern=str(pattern),
        target={
            "sparsity": cfg.sparsity,
            "scope": cfg.scope,
            "latency": cfg.latency,
            "loss_budget": cfg.loss_budget,
        },
        compensate=compensate,
        calibration={"windows": len(windows), "seqlen": windows.shape[1]},
        config={k: v for k, v in asdict(cfg).items() if k not in ("latency_table",)},
        reconstruction_error=errors,
        seconds={k: round(v, 2) for k, v in timings.items()},
    )
    return rep
