"""Weight compensation with a fixed mask (docs/DESIGN.md §5): re-solve the kept weights of every row.

Glossary (shapes in comments use these letters):
    o, i     out / in features of an nn.Linear; W is (o, i), one row = one kernel
    X        (tokens, i) calibration inputs of the layer
    H        (i, i) X^T X (any positive scale), damped: H + γ·mean(diag H)·I, γ = ``damp``
    mask     (o, i) bool, True = kept;  for one row, q = pruned columns, k = kept columns

For a row w with pruned set q, the multi-weight OBS update (Optimal Brain Surgeon, SparseGPT eq. 2)

    δw = −w_q (H⁻¹_qq)⁻¹ H⁻¹_q,:

is the minimiser of δwᵀ H δw subject to (w + δw)_q = 0. Written over the kept columns instead it is
least squares of the row's output on the calibration tokens:

    w_k,new = argmin_v ‖X w − X_k v‖²   ⇔   H_kk v = H_k,: w   (the normal equations).

``compensate_ref`` is the OBS formula row by row (the spec). ``compensate`` is batched: a row costs
one factorisation, of H_kk (normal equations, |k| kept) or of H⁻¹_qq (OBS, |q| pruned), whichever is
smaller; rows that share a mask share the factorisation, rows with different masks of the same size
are solved together as one batch of gathered systems.

Measured (2-core Xeon of these machines, another process busy on one core, torch 2.13 CPU fp32,
``torch.set_num_threads(1)``), a 1536×768 layer, H from 4096 correlated tokens, every row its own
random C_4^n mask: n = 2 in every row (a 2:4 mask) 3.1 s, n uniform in {1, 2, 3} 1.6 s, n uniform in
{0..4} 1.2 s, n = 1 or n = 3 in every row 1.0 s; one mask shared by all rows 0.09 s. About half is the
Cholesky factorisations (k³/3 flops a row), half gathering H_kk. With two OpenMP threads while the
other core was busy, the same calls took 5-15x longer (MKL's threaded small factorisations).
"""

from __future__ import annotations

import time

import torch

from ..errors import SparsambaError
from .scores import hessian_damped

# elements of scratch per batched solve (the (b, k, k) gathered H_kk plus right-hand sides): 16 MiB in
# fp32, measured faster than 4x more or less
_BATCH_ELEMS = 1 << 22
# a mask shared by at least this many rows gets its own factorisation with a multi-column solve
_SHARED_ROWS = 8


def check_layer(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise SparsambaError unless W is (o, i), H is a finite (i, i) and mask a bool (o, i)."""
    if W.dim() != 2:
        raise SparsambaError(f"weight must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    i = W.shape[1]
    if tuple(H.shape) != (i, i):
        raise SparsambaError(
            f"H must be ({i}, {i}) for a weight of shape {tuple(W.shape)}, got {tuple(H.shape)}"
        )
    if not torch.isfinite(H).all():
        raise SparsambaError(
            "H (X^T X of the calibration inputs) has NaN or inf entries: the layer's inputs overflowed "
            "or are corrupt; check the calibration data and run calibration in float32"
        )
    if not torch.isfinite(W).all():
        raise SparsambaError(f"weight of shape {tuple(W.shape)} has NaN or inf entries")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise SparsambaError(f"mask must be a bool tensor (True = kept), got {mask.dtype}")
        if mask.shape != W.shape:
            raise SparsambaError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(W.shape)}")


def damped_hessian(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp·mean(diag H)·I with dead inputs fixed, the dead-input flags (i,)), H copied.

    A dead input (diag H = 0: the column of X is all zero) has a zero row and column in H; its
    diagonal is set to 1, as SparseGPT does, so that H stays invertible and the column decouples.
    Raises SparsambaError if the result is not positive definite.
    """
    dead = H.diagonal() == 0
    H = H.clone()
    H[dead, dead] = 1
    H = hessian_damped(H, damp)  # validates H and damp too
    _, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise SparsambaError(
            f"H is not positive definite even after damping {damp} x mean(diag H) (Cholesky failed at "
            f"column {info.item()}): use more calibration data (tokens >> in_features) or a larger damping"
        )
    return H, dead


def _cholesky(A: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if (info != 0).any():  # a principal submatrix of a PD matrix is PD; only rounding gets here
        raise SparsambaError(
            "a kept-columns block of H is not positive definite (rounding): use a larger damping "
            "or compute in float64"
        )
    return L


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """trace((W−Ŵ) H (W−Ŵ)ᵀ) / trace(W H Wᵀ): ‖XWᵀ − XŴᵀ‖²_F / ‖XWᵀ‖²_F on the calibration tokens."""
    W64, H64 = W.detach().double(), H.detach().to(W.device, torch.float64)
    D = W64 - W_new.detach().to(W.device, torch.float64)
    num = ((D @ H64) * D).sum().item()
    den = ((W64 @ H64) * W64).sum().item()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def _work_dtype(W: torch.Tensor, H: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32


@torch.no_grad()
def compensate_ref(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp: float = 0.001) -> torch.Tensor:
    """The spec of ``compensate``: the OBS update δw = −w_q (H⁻¹_qq)⁻¹ H⁻¹_q,: row by row, in float64."""
    check_layer(W, H, mask)
    Hd, _ = damped_hessian(H.detach().to(W.device, torch.float64), damp)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))  # (i, i)
    out = W.detach().to(torch.float64).clone()
    for r in range(W.shape[0]):
        q = (~mask[r]).nonzero().flatten()  # pruned columns of row r
        if len(q) == 0:
            continue
        w = out[r]
        lam = torch.linalg.solve(Hinv[q][:, q], w[q])  # (H⁻¹_qq)⁻¹ w_q  (|q|,)
        w -= lam @ Hinv[q]  # δw = −w_q (H⁻¹_qq)⁻¹ H⁻¹_q,:
        w[q] = 0  # exact zeros (the update gives them up to rounding)
    return out.to(W.dtype)


@torch.no_grad()
def compensate(
    W: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    damp: float = 0.001,
    debug: bool = False,
    name: str = "",
) -> torch.Tensor:
    """Re-solve the kept weights of every row for a fixed mask; returns Ŵ (o, i) in W's dtype.

    W (o, i) weight, H (i, i) X^T X of the layer inputs (any positive scale), mask (o, i) bool with
    True = kept. Ŵ is exactly zero where mask is False; its row r minimises ‖X W[r] − X Ŵ[r]‖² over
    the kept columns, with H damped by ``damp``·mean(diag H)·I (γ = 0.001 as in the paper). Fully
    kept rows come back unchanged, fully pruned rows as zeros. Runs on W's device, in float32
    (float64 if W or H is float64). ``debug`` prints one line: the relative reconstruction error of
    plain masking and of the compensated weights.
    """
    check_layer(W, H, mask)
    tick = time.perf_counter()
    dev, dt = W.device, _work_dtype(W, H)
    mask = mask.to(dev)
    Hd, _ = damped_hessian(H.detach().to(dev, dt), damp)
    Wf = W.detach().to(dt)
    out = torch.zeros_like(Wf)  # rows with nothing kept stay zero
    P = Wf @ Hd  # (o, i): row r is (H w_r)ᵀ, the right-hand sides H_k,: w before gathering k

    # the U distinct masks (U, i), the mask of each row (o,), rows per mask (U,)
    uniq, inv, counts = torch.unique(mask, dim=0, return_inverse=True, return_counts=True)
    kept = uniq.sum(1)  # (U,)
    i = W.shape[1]
    # a row costs one factorisation of H_kk (kept route) or of H⁻¹_qq (OBS route, then one GEMM for
    # all rows): take the smaller, |k| or |q| = i − |k|. For C_4^n that is i/4 instead of 3i/4 for
    # rows with n = 1 — 27x fewer flops — and i/2 at worst.
    obs = (kept > i - kept) & (kept < i)  # (U,) masks solved through H⁻¹
    Hinv = Lam = None
    if obs.any():
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd.double())).to(dt)  # (i, i), fp64 once
        Lam = torch.zeros_like(Wf)  # (o, i): λ = (H⁻¹_qq)⁻¹ w_q scattered at q, zero elsewhere
    for k in kept.unique().tolist():
        us = (kept == k).nonzero().flatten()  # unique masks with k kept columns
        if k == 0:
            continue
        if k == i:  # dense rows: H v = H w gives v = w
            rows = torch.isin(inv, us)
            out[rows] = Wf[rows]
            continue
        if k > i - k:  # OBS route: (H⁻¹_qq) λ = w_q
            _solve_rows(Hinv, Wf, ~uniq, inv, counts, us, i - k, Lam)
        else:  # kept route: H_kk v = H_k,: w
            _solve_rows(Hd, P, uniq, inv, counts, us, k, out)
    if Lam is not None:
        rows = obs[inv].nonzero().flatten()
        # δw = −w_q (H⁻¹_qq)⁻¹ H⁻¹_q,: = −λ H⁻¹ for all OBS rows in one GEMM; exact zeros at q after
        out[rows] = (Wf[rows] - Lam[rows] @ Hinv) * mask[rows]

    if debug:
        masked = reconstruction_error(W, W * mask, H)
        after = reconstruction_error(W, out, H)
        print(
            f"compensate {name or tuple(W.shape)}: kept {mask.float().mean().item():.1%}, rel. reconstruction "
            f"error masked {masked:.4g} -> compensated {after:.4g} ({time.perf_counter() - tick:.2f} s)"
        )
    return out.to(W.dtype)


def _solve_rows(
    S: torch.Tensor,
    R: torch.Tensor,
    sel: torch.Tensor,
    inv: torch.Tensor,
    counts: torch.Tensor,
    us: torch.Tensor,
    k: int,
    out: torch.Tensor,
) -> None:
    """For every row r whose unique mask u is in ``us``, with c = sel[u].nonzero() (k columns):
    solve S_cc x = R[r, c] and write x into out[r, c].

    A selection shared by at least _SHARED_ROWS rows gets its own factorisation and a multi-column
    solve; the others are solved as batches of k×k systems, right-hand sides padded to the largest
    number of rows per selection in the batch.
    """
    shared = us[counts[us] >= _SHARED_ROWS]
    for u in shared.tolist():
        rows = (inv == u).nonzero().flatten()
        c = sel[u].nonzero().flatten()  # (k,)
        L = _cholesky(S[c][:, c])
        out[rows[:, None], c] = torch.cholesky_solve(R[rows][:, c].T, L).T
    us = us[counts[us] < _SHARED_ROWS]
    if len(us) == 0:
        return
    order = torch.argsort(inv, stable=True)
    rows_all = order[torch.isin(inv[order], us)]  # rows of these selections, grouped by selection
    slot_of = torch.full_like(counts, -1)
    cols_all = sel[us].nonzero()[:, 1].view(len(us), k)  # (U_k, k) selected columns, ascending
    B = max(1, _BATCH_ELEMS // (k * (k + _SHARED_ROWS)))
    ar = torch.arange(k, device=inv.device)
    for s in range(0, len(us), B):
        ub = us[s : s + B]
        cols = cols_all[s : s + B]  # (b, k)
        slot_of[ub] = torch.arange(len(ub), device=inv.device)
        rows = rows_all[torch.isin(inv[rows_all], ub)]  # (n,) grouped by selection
        slot = slot_of[inv[rows]]  # (n,) which system each row belongs to, ascending
        pos = torch.arange(len(rows), device=inv.device) - torch.searchsorted(slot, slot)  # (n,) rhs column
        L = _cholesky(S[cols[:, :, None], cols[:, None, :]])  # (b, k, k)
        rhs = torch.zeros(len(ub), k, int(pos.max()) + 1, dtype=R.dtype, device=R.device)  # (b, k, c)
        rcols = cols[slot]  # (n, k)
        rhs[slot[:, None], ar, pos[:, None]] = R[rows].gather(1, rcols)
        y = torch.linalg.solve_triangular(L, rhs, upper=False)  # L Lᵀ x = rhs
        x = torch.linalg.solve_triangular(L.mT, y, upper=True)  # (b, k, c)
        out[rows[:, None], rcols] = x[slot[:, None], ar, pos[:, None]]
