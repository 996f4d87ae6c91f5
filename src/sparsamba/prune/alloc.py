"""Loss-aware allocation of C_4^n's per-row n: the starting point and the fix-up of learn.py.

Every prunable row r gets a cost curve over n = 0..4,

    cost_r(n) = F_r · e_r(n)

    e_r(n)  the row's output error on the calibration tokens after EXACT compensation of its kept
            weights at n:  e_r(n) = min_v ‖X w_r − X_k v‖² = δwᵀ H δw  (H = XᵀX, damped for the solve);
            e_r(0) = 0 and e_r(4) = w_rᵀ H w_r, the whole output energy of the row. The masks at n are
            SparseGPT's sequential OBS selection, the same masks the final prune uses for that n
            (a row's selection depends only on its own weights and n, so a uniform-n run gives each
            row's mask at every n).
    F_r     the mean squared gradient of the next-token loss w.r.t. output channel r of the layer
            (the diagonal empirical Fisher of the layer's output), so F_r · e_r(n) is the second-order
            estimate 2·ΔL of the loss increase. It puts rows of different layers and blocks on one scale,
            which the per-layer-normalised OBS saliency of learn.py's prior cannot.

The allocation then minimises Σ_r cost_r(n_r) subject to Σ_r removed_r(n_r) ≥ budget (a knapsack
with five choices per row). The curves need not be convex in n (n = 4 is often cheaper per weight
than n = 3, e.g. for a dead row), so a plain "cheapest next step" greedy can stall in front of a
concave step. Instead we solve the Lagrangian relaxation exactly: for a price λ per removed weight,
each row independently takes argmin_n cost_r(n) − λ·removed_r(n), which walks the vertices of the
row's lower convex hull as λ grows; a bisection on λ finds the largest allocation within budget, and
single steps at the cheapest marginal cost per weight top it up to the budget (at most a few rows).
All vectorised over every row of the model: a fraction of a second for the 130M model's 130k rows.

Pure functions on tensors; the hooks that gather F live in calibrate.output_fisher, the walk that
feeds these functions in methods.py (c4's plan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .compensate import compensate
from .sparsegpt import sparsegpt


@torch.no_grad()
def c4_masks(W: Tensor, H: Tensor, damp: float = 0.01) -> Tensor:
    """(5, out, in) bool keep-masks at n = 0..4 for every row, chosen by SparseGPT's sequential OBS
    selection (as methods.py's c4 select does for a given n)."""
    o, i = W.shape
    masks = torch.ones(5, o, i, dtype=torch.bool, device=W.device)
    masks[4] = False
    for n in (1, 2, 3):
        _, masks[n] = sparsegpt(W, H, f"c4n{n}", damp=damp)
    return masks


@torch.no_grad()
def compensated_weights(W: Tensor, H: Tensor, masks: Tensor, damp: float = 0.001) -> Tensor:
    """(5, out, in): W re-solved on the kept columns of masks[n] (DESIGN.md §5) for each n."""
    out = torch.empty(masks.shape, dtype=W.dtype, device=W.device)
    for n in range(5):
        out[n] = W if n == 0 else (torch.zeros_like(W) if n == 4 else compensate(W, H, masks[n], damp))
    return out


def row_errors(W: Tensor, Wn: Tensor, H: Tensor) -> Tensor:
    """(out, 5) float64: e_r(n) = (w_r − ŵ_r,n)ᵀ H (w_r − ŵ_r,n), the output error of row r summed over
    the calibration tokens, for the candidate weights Wn (5, out, in). H undamped: the error is measured
    on the data, the damping only regularises the solve."""
    H64 = H.double()
    D = W.double()[None] - Wn.double()  # (5, out, in)
    return ((D @ H64) * D).sum(-1).T.contiguous()


def _choose(costs: Tensor, gains: Tensor, lam: float) -> Tensor:
    # argmin_n cost − λ·gain; ties go to the smaller n (torch.argmin returns the first minimum)
    return torch.argmin(costs - lam * gains, dim=1)


def allocate(costs: Tensor, gains: Tensor, budget: float, iters: int = 100) -> tuple[Tensor, float]:
    """(n, λ): n (rows,) long minimising Σ costs[r, n_r] subject to Σ gains[r, n_r] ≥ budget, and λ
    the price per unit gain at which the Lagrangian choice stops short of the budget.

    costs (rows, 5) with costs[:, 0] = 0 ideally; gains (rows, 5), nondecreasing in n, gains[:, 0] = 0:
    the weights removed (or latency saved) by row r at n. The result meets the budget to within one
    row's step and is optimal among allocations on the convex hulls (the Lagrangian solution).
    """
    costs, gains = costs.double(), gains.double().expand_as(costs)
    total = gains[:, -1].sum().item()
    if budget >= total:
        return torch.full((costs.shape[0],), costs.shape[1] - 1, dtype=torch.long, device=costs.device), 0.0
    if budget <= 0:
        return torch.zeros(costs.shape[0], dtype=torch.long, device=costs.device), 0.0

    def got(n: Tensor) -> float:
        return gains.gather(1, n[:, None]).sum().item()

    # bracket λ: at 0 nothing positive-cost is removed; at a price above every slope all is removed
    dc = (costs[:, 1:] - costs[:, :1]).abs().max().item()
    dg = (gains[:, 1:] - gains[:, :1]).clamp_min(0)
    dg = dg[dg > 0].min().item()
    lo, hi = 0.0, 2 * dc / dg + 1.0
    n_lo = _choose(costs, gains, lo)
    if got(n_lo) < budget:
        for _ in range(iters):  # bisection in λ: lo stays under budget
            mid = 0.5 * (lo + hi)
            n_mid = _choose(costs, gains, mid)
            if got(n_mid) < budget:
                lo, n_lo = mid, n_mid
            else:
                hi = mid
            if hi - lo <= 1e-12 * hi:
                break
    # top up: move one row at a time to any larger n at the cheapest cost per unit gain (a jump past
    # a concave step, e.g. straight to n = 4, is priced like any other); rows at the threshold price
    # come first in that order, so this completes the Lagrangian step row by row
    n = n_lo.clone()
    deficit = budget - got(n)
    rows = torch.arange(len(n), device=n.device)
    ks = torch.arange(costs.shape[1], device=n.device)
    while deficit > 0:
        c0, g0 = costs[rows, n][:, None], gains[rows, n][:, None]
        dgain = gains - g0  # (rows, 5)
        price = (costs - c0) / dgain.clamp_min(1e-300)
        price[(ks[None] <= n[:, None]) | (dgain <= 0)] = float("inf")
        flat = int(torch.argmin(price))
        r, k = divmod(flat, costs.shape[1])
        if not torch.isfinite(price[r, k]):
            break
        deficit -= float(dgain[r, k])
        n[r] = k
    # over the budget (the last jump, or a zero-price choice that already removes too much, as the
    # fix-up's −log p gives): move rows down, most cost saved (or least added) per unit given back,
    # while the slack allows
    while deficit < 0:
        c0, g0 = costs[rows, n][:, None], gains[rows, n][:, None]
        loss = g0 - gains  # gain given back by moving row r down to k
        ok = (ks[None] < n[:, None]) & (loss <= -deficit) & (loss > 0)
        if not ok.any():
            break
        rate = (c0 - costs) / loss.clamp_min(1e-300)
        rate[~ok] = -float("inf")
        flat = int(torch.argmax(rate))
        r, k = divmod(flat, costs.shape[1])
        deficit += float(loss[r, k])
        n[r] = k
    return n, lo


def allocate_scoped(
    costs: list[Tensor], gains: list[Tensor], groups: list[int], fraction: float, row_block: int = 1
) -> list[Tensor]:
    """Allocate per scope: layers with the same ``groups`` id share one budget of ``fraction`` of
    their total gain (group = block index for scope 'block', 0 for 'global'). ``row_block`` rows share
    one n (their costs and gains summed). Returns (n (out,) per layer, λ per layer's group)."""
    result: list[Tensor | None] = [None] * len(costs)
    prices = [0.0] * len(costs)
    for g in dict.fromkeys(groups):
        idx = [k for k, gg in enumerate(groups) if gg == g]
        cs, gs, sizes = [], [], []
        for k in idx:
            c, ga = costs[k], gains[k].expand_as(costs[k])
            pad = -c.shape[0] % row_block
            c = F.pad(c, (0, 0, 0, pad)).view(-1, row_block, c.shape[1]).sum(1)
            ga = F.pad(ga, (0, 0, 0, pad)).view(-1, row_block, ga.shape[1]).sum(1)
            cs.append(c)
            gs.append(ga)
            sizes.append(c.shape[0])
        C, G = torch.cat(cs), torch.cat(gs)
        n, lam = allocate(C, G, fraction * G[:, -1].sum().item())
        for k, part in zip(idx, n.split(sizes)):
            result[k] = part.repeat_interleave(row_block)[: costs[k].shape[0]]
            prices[k] = lam
    return result, prices  # type: ignore[return-value]
