"""Compensation toward the DENSE model's outputs, and block-wise reconstruction.

A layer pruned in place re-solves its kept weights so that its output on the *pruned* model's inputs
X_p stays close to what the same weights gave on X_p: min_v ‖X_p w − X_p v‖². What the model needs is
the dense output, the dense layer on the dense inputs X_d:

    min_v ‖X_p v − X_d w‖² + ρ‖v − w‖²   (ρ = damp · mean diag H_p, the usual damping as a ridge)

which equals (v − w*)ᵀ H̃ (v − w*) + const with H̃ = X_pᵀX_p + ρI and

    w* = H̃⁻¹ (X_pᵀ X_d w + ρ w)

so every method (SparseGPT's OBS, the exact re-solve, a mask from scores) aims at the dense outputs
unchanged when it is handed w* instead of w. G = X_pᵀ X_d comes from calibrate.BlockWalker run with
``dense=True`` (a dense copy walked beside the pruned model). With X_p = X_d, W* = W.

``reconstruct`` then fine-tunes the kept weights of one pruned block with Adam so that the block's
output on its pruned inputs matches the dense block's on the dense inputs: the same cross-block
correction, by gradient descent through the nonlinear block.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compensate import damped_hessian


@torch.no_grad()
def dense_target_weights(W: Tensor, Hp: Tensor, G: Tensor, damp: float) -> Tensor:
    """W* (out, in): row r is argmin_v ‖X_p v − X_d w_r‖² + ρ‖v − w_r‖², ρ = damp·mean(diag Hp).

    Hp = X_pᵀX_p, G = X_pᵀX_d (in, in), sums over the same calibration tokens. Solved in float64
    through one Cholesky factor of the damped Hp.
    """
    Hd, dead = damped_hessian(Hp.double(), damp)
    live = ~dead
    rho = float(Hd.diagonal()[live].mean() - Hp.double().diagonal()[live].mean()) if live.any() else 0.0
    W64 = W.double()
    rhs = W64 @ G.double().T + rho * W64  # (out, in): rows (X_pᵀ X_d w + ρ w)ᵀ
    Ws = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(Hd)).T
    Ws[:, dead] = W64[:, dead]  # an input that is always zero carries nothing: keep the weight
    return Ws.to(W.dtype)


def reconstruct(
    run: Callable[[int], Tensor],
    targets: list[Tensor],
    params: dict[str, tuple[nn.Parameter, Tensor]],
    steps: int,
    lr: float,
    seed: int = 0,
) -> tuple[float, float]:
    """Adam on the kept weights of one block, cosine lr from ``lr`` to 0.

    run(k) is the pruned block's output (b, l, d) on its k-th input batch, targets[k] the dense block's;
    params: name → (weight, keep-mask (out, in) bool); pruned weights stay exact zeros. One batch per
    step. Returns the MSE over all batches (before, after)."""

    def mse_all() -> float:
        with torch.no_grad():
            num = sum(F.mse_loss(run(k).float(), t, reduction="sum").item() for k, t in enumerate(targets))
        return num / sum(t.numel() for t in targets)

    before = mse_all()
    weights = [p for p, _ in params.values()]
    was = [p.requires_grad for p in weights]
    for p in weights:
        p.requires_grad_(True)
    opt = torch.optim.Adam(weights, lr=lr)
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for step in range(steps):
                for grp in opt.param_groups:
                    grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                k = int(torch.randint(0, len(targets), (1,), generator=g))
                loss = F.mse_loss(run(k).float(), targets[k])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, keep in params.values():
                    p.grad.mul_(keep)  # Adam's step is 0 where its moments are 0
                opt.step()
                with torch.no_grad():
                    for p, keep in params.values():
                        p.mul_(keep)  # exact zeros whatever the optimiser's rounding
    finally:
        for p, w in zip(weights, was):
            p.requires_grad_(w)
            p.grad = None
    return before, mse_all()
