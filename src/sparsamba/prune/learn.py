"""Sparse learning: choose n ∈ {0..4} for every row (docs/DESIGN.md §4), straight through.

Weights stay frozen. Row r has logits α_r ∈ R⁵ over n, p_r = softmax(α_r), and five candidate rows
ŵ_r,n: its kept weights at n, compensated (alloc.compensated_weights). The forward uses the HARD
choice n̂_r = argmax α_r; the backward sees the expected weight (straight-through):

    W_eff = Ŵ_n̂ + Σ_n p_n Ŵ_n − stopgrad(Σ_n p_n Ŵ_n)

so ∂L/∂p_r,n = ⟨∂L/∂w_r, ŵ_r,n⟩, a first-order estimate, at the pruned point, of switching row r to n.
The target is an equality, s = s* (the fix-up meets it exactly, so an overshoot costs moved rows like
a shortfall), on the fraction removed s (weights for a sparsity target, latency saved for a latency
target) of the HARD choice, with the gradient of its expectation E[s] = Σ p·gain / Σ gain(4)
(straight-through again). Loss = KL(dense ‖ sparse) per token + λ₀·(μ·c + ρ/2·c²), c = (s* − s)/s*:
an augmented Lagrangian, λ₀ sized at the first step so that the constraint's gradient matches the
KL's, μ (either sign) raised by dual_lr·c after every step. p = softmax(α/τ) with τ lowered from 1 to
``temperature`` over the steps, so that E[s] ends near the hard choice's s. Adam with a cosine schedule
moves every logit ~lr per step whatever the scale of its gradient.

Before (a price λ > 0 on s* − E[s], raised or lowered multiplicatively): the price never changed sign,
so it pushed E[s] up even past s* (0.683 → 0.732 for 0.70 on the embedded model, the fix-up moving
8.7% of rows); and held on E[s] alone, it was met with probability on n's no row chose (E[s] 0.50 with
the argmax at 0.30 on a test layer).

The logits start from the loss-aware allocation (alloc.py): α = −(cost − λ₀·gain)/scale with the
allocation's n on top, scale set so that the median p(argmax) is ``confidence``; learning only has
to correct it. The result is met exactly by ``fixup``: the allocation again, with cost −log p.
"""

from __future__ import annotations

import math
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SparsambaError
from .alloc import allocate_scoped


@dataclass
class LearnConfig:
    # 0 = the loss-aware allocation alone, the default: 150 steps gave the same perplexity on the
    # embedded model at 50% (38.13 vs 38.13) for ~3x the prune time (docs/results.md)
    steps: int = 0
    lr: float = 0.05  # Adam, cosine to 0
    batch_size: int = 4  # calibration windows per step
    dual_lr: float = 0.5  # μ ← μ + dual_lr · (s* − E[s]) / s* after every step (the integral term)
    penalty: float = 10.0  # ρ of the quadratic term: λ₀·(μ + ρ·(s* − E[s]) / s*) is the price of E[s]
    temperature: float = 0.25  # p = softmax(α / τ), τ from 1 down to this: E[s] → the hard choice's
    confidence: float = 0.8  # median p(argmax) of the starting logits
    fisher_windows: int = 48  # calibration windows for the loss gradients F_r of the cost
    row_block: int = 1  # rows sharing one n (4 or 8 for wider SIMD)
    seed: int = 0

    def __post_init__(self) -> None:
        # checked once, here: a negative step count or a zero row block fails before any work
        counts = {"steps": 0, "batch_size": 1, "fisher_windows": 1, "row_block": 1}
        for k, lo in counts.items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SparsambaError(f"learn: {k} must be a whole number >= {lo}, got {v!r}")
        for k in ("lr", "dual_lr", "penalty"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SparsambaError(f"learn: {k} must be a finite number >= 0, got {v!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise SparsambaError(f"learn: temperature must be in (0, 1], got {t!r}")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.2 < c < 1:
            raise SparsambaError(
                f"learn: confidence must be in (0.2, 1), a probability above uniform; got {c!r}"
            )


def start_logits(
    costs: dict[str, Tensor],
    gains: dict[str, Tensor],
    n0: dict[str, Tensor],
    prices: dict[str, float],
    confidence: float,
) -> dict[str, Tensor]:
    """α (out, 5) per layer whose argmax is the allocation n0 and whose order is cost − λ·gain."""
    A = {k: costs[k] - prices[k] * gains[k] for k in costs}  # (out, 5)
    top2 = torch.cat([(-a).topk(2, 1).values for a in A.values()])  # (rows, 2)
    gap = float((top2[:, 0] - top2[:, 1]).median())
    scale = gap / math.log(confidence / (1 - confidence)) if gap > 0 else 1.0
    out = {}
    for k, a in A.items():
        a = -a / scale
        a = a - a.amax(1, keepdim=True)
        # rows moved by the allocation's top-up are not the Lagrangian argmin: put n0 on top
        a.scatter_(1, n0[k][:, None], 0.5)
        out[k] = a.float()
    return out


def expected_fraction(
    logits: dict[str, Tensor], gains: dict[str, Tensor], total: float, tau: float = 1.0
) -> Tensor:
    return sum((torch.softmax(logits[k] / tau, -1) @ gains[k].float()).sum() for k in logits) / total


def hard_fraction(logits: dict[str, Tensor], gains: dict[str, Tensor], total: float) -> Tensor:
    return sum(gains[k].float()[logits[k].argmax(-1)].sum() for k in logits) / total


def learn_logits(
    model: nn.Module,
    windows: Tensor,
    layers: dict[str, nn.Linear],
    cand: dict[str, Tensor],
    logits: dict[str, Tensor],
    gains: dict[str, Tensor],
    fraction: float,
    cfg: LearnConfig,
    what: str = "expected sparsity",
    progress: bool = True,
    log=print,
) -> dict[str, float]:
    """Train ``logits`` (name → (out, 5), in place) of ``layers`` with candidates ``cand`` (name →
    (5, out, in)) toward E[Σ gain] = ``fraction`` of the total; weights frozen. Returns diagnostics."""
    from ..progress import progress as progress_bar

    total = sum(float(gains[k][-1]) * layers[k].out_features for k in layers)
    params = [logits[k].requires_grad_(True) for k in layers]
    # eps far below any gradient here: the step is ~lr whatever the scale of the loss (a near-uniform
    # model's KL has gradients of 1e-9, below Adam's default eps, and would not move at all)
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-20)
    state = {"active": False, "tau": 1.0}

    def make_fwd(k: str):
        rows = torch.arange(layers[k].out_features)

        def fwd(mod, x):
            if not state["active"]:
                return F.linear(x, mod.weight, mod.bias)
            a = logits[k]
            soft = torch.einsum("on,noi->oi", torch.softmax(a / state["tau"], -1), cand[k])
            hard = cand[k][a.argmax(-1), rows]  # (out, in)
            return F.linear(x, (hard + soft - soft.detach()).to(mod.weight.dtype), mod.bias)

        return fwd

    for k, m in layers.items():
        m.forward = types.MethodType(make_fwd(k), m)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed)
    lam, mu, scale = None, 1.0, max(fraction, 1e-6)
    with torch.no_grad():
        start = float(expected_fraction(logits, gains, total))
    t0 = time.time()
    try:
        bar = progress_bar(range(cfg.steps), desc="learn", unit="steps", enabled=progress)
        for step in bar:
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            # the distribution sharpens as the steps shrink, so that the expectation the constraint
            # holds at s* becomes the hard choice's sparsity, the one the fix-up has to meet
            state["tau"] = cfg.temperature ** ((step + 1) / cfg.steps)
            batch = windows[torch.randint(0, len(windows), (cfg.batch_size,), generator=g)]
            state["active"] = False
            with torch.no_grad():
                dense = F.log_softmax(model(batch).float(), -1)
            state["active"] = True
            sparse = F.log_softmax(model(batch).float(), -1)
            kl = F.kl_div(sparse.flatten(0, 1), dense.flatten(0, 1), log_target=True, reduction="batchmean")
            es = expected_fraction(logits, gains, total, state["tau"])
            with torch.no_grad():
                hard = hard_fraction(logits, gains, total)
            # the constraint holds the hard choice (the one the forward uses and the fix-up must
            # meet) at s*, its gradient the expectation's (straight-through): on E[s] alone the
            # optimiser met s* with mass on n's no row chose (E[s] 0.50, argmax 0.30)
            st = hard + es - es.detach()
            short = (fraction - st) / scale  # the relative shortfall; < 0 past the target
            if (
                lam is None and kl.item() > 1e-6
            ):  # λ₀ sized so that the constraint's gradient matches the KL's
                gk = torch.autograd.grad(kl, params, retain_graph=True, allow_unused=True)
                gs = torch.autograd.grad(short, params, retain_graph=True)
                nk = math.sqrt(sum(float((x**2).sum()) for x in gk if x is not None))
                ns = math.sqrt(sum(float((x**2).sum()) for x in gs))
                lam = nk / max(ns, 1e-30)
            opt.zero_grad(set_to_none=True)
            if lam is None:
                # while the hard choice is still the dense model (KL 0, no gradient to match) the
                # constraint alone steps: Adam's step does not depend on the loss's scale
                (short.detach().sign() * short).backward()
            else:
                # an equality: the fix-up meets s* exactly, so overshooting costs rows as much as
                # falling short. Augmented Lagrangian: μ (the multiplier, either sign) integrates the
                # shortfall, ρ·short² pulls back at once; a one-sided, always-positive price
                # (λ·(s* − E[s]) with λ > 0) kept pushing E[s] past s* (0.73 for 0.70)
                (kl + lam * (mu * short + 0.5 * cfg.penalty * short**2)).backward()
                mu += cfg.dual_lr * float(short.detach())
            opt.step()
            bar.set_postfix_str(f"KL {kl.item():.4f}, {what} {es.item():.2f} → {fraction:.2f}")
    finally:
        for m in layers.values():
            del m.forward  # back to the class's forward
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)
        for a in params:
            a.requires_grad_(False)
    with torch.no_grad():
        if cfg.steps:
            for k in logits:  # the learned distribution is the sharpened one
                logits[k].div_(state["tau"])
        end = float(expected_fraction(logits, gains, total))
        hard = float(hard_fraction(logits, gains, total))
    log(
        f"learned C_4^n logits of {len(layers)} layers in {time.time() - t0:.1f} s: {what} {start:.3f} → "
        f"{end:.3f} (argmax {hard:.3f})"
    )
    return {
        "expected_before": round(start, 4),
        "expected_after": round(end, 4),
        "argmax_after": round(hard, 4),
        "learn_s": time.time() - t0,
    }


def fixup(
    logits: dict[str, Tensor],
    gains: dict[str, Tensor],
    groups: dict[str, int],
    fraction: float,
    row_block: int,
) -> tuple[dict[str, Tensor], float]:
    """Meet the target exactly from the learned distribution: the allocation with cost −log p, so
    argmax rows stay unless moving them is the cheapest way to the budget of each scope. Returns (n
    per layer, fraction of rows whose n differs from argmax α)."""
    names = list(logits)
    costs = []
    for k in names:
        c = -torch.log_softmax(logits[k].double(), -1)
        costs.append(c - c.amin(1, keepdim=True))  # 0 at the argmax: costs relative to staying
    ns, _ = allocate_scoped(
        costs, [gains[k].double()[None] for k in names], [groups[k] for k in names], fraction, row_block
    )
    moved = sum(int((n != logits[k].argmax(-1)).sum()) for k, n in zip(names, ns))
    return dict(zip(names, ns)), moved / sum(len(n) for n in ns)
