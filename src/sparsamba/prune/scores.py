"""Per-weight importance scores of a linear layer from its calibration statistics (docs/DESIGN.md §3).

Pure functions on tensors; a higher score means more important, kept first by
``pattern.mask_from_scores``. Shapes use these names:
    W        (out, in)  the layer's weight
    X        (t, in)    the layer's input over t calibration tokens (only its statistics come here)
    x_norm   (in,)      ‖X_j‖₂, the L2 norm of input feature j over the calibration tokens
    H        (in, in)   XᵀX, the Hessian of the squared output error of one row (up to a factor 2)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SparsambaError


def magnitude(W: Tensor) -> Tensor:
    """|W|, (out, in)."""
    return W.abs()


def wanda(W: Tensor, x_norm: Tensor) -> Tensor:
    """Wanda (Sun et al. 2023): S_ij = |W_ij| · ‖X_j‖₂, (out, in); meant to be compared within a row."""
    _check_weight(W)
    if not isinstance(x_norm, Tensor) or tuple(x_norm.shape) != (W.shape[1],):
        desc = tuple(x_norm.shape) if isinstance(x_norm, Tensor) else type(x_norm).__name__
        raise SparsambaError(
            f"wanda: x_norm must be ({W.shape[1]},), the L2 norm of each input feature of W {tuple(W.shape)}; "
            f"got {desc}"
        )
    return W.abs() * x_norm.to(W.dtype)  # (out, in) * (in,): one scale per input column


def hessian_damped(H: Tensor, damp: float) -> Tensor:
    """H + damp · mean(diag H) · I, (in, in), in H's dtype; H itself is left as it is.

    The relative damping of SparseGPT (percdamp = 0.01) and of compensation (γ = 0.001): it makes XᵀX
    invertible when features are dead or collinear, scaled to the layer so that one damp fits all.
    """
    if not isinstance(H, Tensor) or H.ndim != 2 or H.shape[0] != H.shape[1] or H.numel() == 0:
        desc = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise SparsambaError(f"H must be a square (in, in) matrix XᵀX, got {desc}")
    if not torch.isfinite(H).all():
        raise SparsambaError(
            "H = XᵀX holds NaN or inf: the calibration activations overflowed; accumulate H in float32 or "
            "float64 and check the model's outputs on the calibration text"
        )
    damp = float(damp)
    if not damp >= 0.0 or damp == float("inf"):
        raise SparsambaError(
            f"damp {damp} is a fraction of mean(diag H) added to the diagonal: give a number >= 0"
        )
    Hd = H.clone()
    Hd.diagonal().add_(damp * H.diagonal().mean())
    return Hd


def obs_saliency(W: Tensor, H: Tensor, damp: float = 0.01) -> Tensor:
    """OBS saliency W_ij² / [H_d⁻¹]_jj, (out, in) in W's dtype, with H_d = hessian_damped(H, damp).

    The loss increase of removing W_ij alone and letting the rest of the row compensate (Hassibi & Stork;
    SparseGPT's mask criterion). Solved in float64 through a Cholesky factor.
    """
    _check_weight(W)
    if not isinstance(H, Tensor) or tuple(H.shape) != (W.shape[1], W.shape[1]):
        desc = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise SparsambaError(
            f"obs_saliency: H must be ({W.shape[1]}, {W.shape[1]}) for W {tuple(W.shape)}, got {desc}"
        )
    Hd = hessian_damped(H.to(torch.float64), damp)
    L, info = torch.linalg.cholesky_ex(Hd)
    if info.item() != 0:
        raise SparsambaError(
            f"H ({Hd.shape[0]}x{Hd.shape[0]}) is not positive definite after damping with damp={damp} "
            f"(leading minor {info.item()} fails): the calibration inputs of this layer are degenerate "
            "(all zero, or too few tokens); use more calibration tokens or a larger damp"
        )
    # H_d⁻¹ = L⁻ᵀ L⁻¹, so [H_d⁻¹]_jj = Σ_i (L⁻¹)_ij²: one triangular solve, no full inverse
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    hinv_diag = torch.linalg.solve_triangular(L, eye, upper=False).square().sum(0)  # (in,)
    return (W.to(torch.float64).square() / hinv_diag).to(W.dtype)


def _check_weight(W: object) -> None:
    if not isinstance(W, Tensor) or W.ndim != 2:
        desc = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise SparsambaError(f"W must be a 2-D weight (out, in), got {desc}")
