"""SparseGPT (Frantar & Alistarh, ICML 2023): one-shot pruning of one linear layer by blocked OBS.

Glossary (shapes in comments use these letters):
    o, i     out / in features; W is the nn.Linear weight (o, i), one row = one kernel
    X        (tokens, i) calibration inputs;  H = XᵀX (i, i), any positive scale (SparseGPT: 2/nsamples)
    Hd       H with dead inputs fixed and damp·mean(diag H) added to the diagonal
    U        (i, i) upper Cholesky factor of Hd⁻¹ (Uᵀ U = Hd⁻¹)
    d_j      U[j, j]: with columns < j already fixed, d_j² = [(Hd_FF)⁻¹]_jj for F = {j, …, i−1}
    mask     (o, i) bool, True = kept (SparseGPT's own mask is True = pruned)

The row-wise OBS problem: fix column j of every row to q_j (0 if pruned, w_j if kept), then move the
columns to its right to absorb the error, optimally for the quadratic loss δwᵀ Hd δw:
    err_j = (w_j − q_j) / d_j,      w_F −= err_j · U[j, F]            (F = columns after j)
The loss added is err_j², summed over a row it equals (w − ŵ)ᵀ Hd (w − ŵ) exactly. Columns go in
blocks of ``blocksize``: inside a block the update is applied column by column, to the rest of the
matrix once per block (the lazy batch update, one GEMM). The mask is chosen lazily, from the current
(already updated) weights, by the OBS saliency w² / d²:
    unstructured  the ``sparsity`` fraction of the whole (o × blocksize) block with the lowest saliency
    N:M / C_4^n   at the first column of each group of M, the n lowest of the group in each row

Pattern conventions — n always counts REMOVED weights:
    ``prune_n``, ``prune_m``   SparseGPT's arguments: remove prune_n of every prune_m (2:4 is 2, 4)
    ``n_removed_per_row``      (o,) per-row n of C_4^n: row r removes n[r] of every 4 (0 dense, 4 all)
    ``sparsegpt(W, H, pattern)`` a ``Pattern`` (pattern.py): N:M counts KEPT weights ("4:8" keeps
                               4 of 8), as the N:M of other tools; c4n1..c4n3 remove n of 4, c4
                               takes the per-row n, unstructured takes ``sparsity``
If ``i`` is not a multiple of M the last group is short: it is treated as padded with zeros (which go
first), so it removes max(0, n − padding) real weights (DESIGN.md §2 pads ``in`` with zeros).

Faithful to the reference code (IST-DASLab/sparsegpt) in every step above (dead inputs: diag set to
1 and their weights zeroed; damping; U; blocks; lazy selection; per-column and lazy batch updates),
with one difference: an unstructured block prunes exactly round(sparsity · o · blocksize) weights
(the reference's ``<= threshold`` prunes one more, plus ties), so the reported sparsity is exact.

Measured (2-core Xeon of these machines, another process busy on one core, torch 2.13 CPU,
``torch.set_num_threads(1)``): a 1536×768 layer, H from 4096 tokens, 0.3-0.4 s for unstructured 50%,
2:4 and per-row C_4^n alike (0.42 s in float64). With two OpenMP threads while the other core was
busy: 12.5 s — the column loop is 768 small ops, each a thread barrier.
"""

from __future__ import annotations

import time

import torch

from ..errors import SparsambaError
from .compensate import check_layer, damped_hessian, reconstruction_error
from .pattern import Pattern, check_sparsity, parse_pattern


def _hinv_upper(Hd: torch.Tensor, damp: float) -> torch.Tensor:
    """U with Uᵀ U = Hd⁻¹ (the reference: cholesky, cholesky_inverse, cholesky upper)."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise SparsambaError(
            f"H⁻¹ is not positive definite even after damping {damp} x mean(diag H): use more calibration "
            "data (tokens >> in_features), a larger damping, or float64"
        )
    return U


def _check_args(
    o: int,
    sparsity: float | None,
    prune_n: int,
    prune_m: int,
    blocksize: int,
    n_removed_per_row: torch.Tensor | None,
    device: torch.device,
) -> tuple[int, torch.Tensor | None]:
    """(M, per-row n (o,) or None for unstructured) from the arguments, or SparsambaError."""
    if blocksize < 1:
        raise SparsambaError(f"blocksize must be positive, got {blocksize}")
    if n_removed_per_row is not None or prune_n:
        if n_removed_per_row is not None and prune_n:
            raise SparsambaError("give either prune_n (same n for every row) or n_removed_per_row, not both")
        m = prune_m or (4 if n_removed_per_row is not None else 0)
        if m < 1:
            raise SparsambaError(f"prune_n={prune_n} needs a group size prune_m >= 1")
        if n_removed_per_row is None:
            if not 0 < prune_n <= m:
                raise SparsambaError(
                    f"prune_n must be in 1..prune_m={m} (weights removed per group), got {prune_n}"
                )
            if sparsity is not None and abs(sparsity - prune_n / m) > 1e-9:
                raise SparsambaError(
                    f"sparsity {sparsity} contradicts removing prune_n={prune_n} of every prune_m={m}"
                )
            n = torch.full((o,), prune_n, dtype=torch.long, device=device)
        else:
            if sparsity is not None:
                raise SparsambaError("n_removed_per_row sets the sparsity; do not also give sparsity")
            n = torch.as_tensor(n_removed_per_row, device=device)
            if n.shape != (o,) or n.is_floating_point() or n.is_complex() or n.dtype == torch.bool:
                raise SparsambaError(
                    f"n_removed_per_row must be an integer tensor of shape ({o},), got {n.dtype} {tuple(n.shape)}"
                )
            n = n.long()
            if len(n) and (n.min() < 0 or n.max() > m):
                raise SparsambaError(
                    f"n_removed_per_row must lie in 0..{m}, got {n.min().item()}..{n.max().item()}"
                )
        if blocksize % m:
            raise SparsambaError(f"blocksize {blocksize} must be a multiple of the group size {m}")
        return m, n
    if sparsity is None:
        raise SparsambaError("give sparsity (unstructured), prune_n and prune_m (N:M), or n_removed_per_row")
    check_sparsity(sparsity)
    return 0, None


def _prune_groups(W1: torch.Tensor, d: torch.Tensor, n: torch.Tensor, m: int) -> torch.Tensor:
    """(o, g) bool, True = pruned: the n[r] lowest w²/d² of each row of the group W1 (o, g), g <= m."""
    g = W1.shape[1]
    n = (n - (m - g)).clamp(min=0)  # a short last group is padded with zeros, which go first
    order = torch.argsort(W1**2 / d**2, dim=1, stable=True)  # (o, g) ascending saliency
    rank_pruned = torch.arange(g, device=W1.device) < n[:, None]  # (o, g) by rank
    return torch.zeros_like(rank_pruned).scatter_(1, order, rank_pruned)


def _obs_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None,
    m: int,
    n: torch.Tensor | None,
    blocksize: int,
    damp: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The solver: (Ŵ (o, i) in ``dtype``, pruned (o, i) bool, loss (o,), Hd) for checked arguments."""
    o, i = W.shape
    Wf = W.detach().to(dtype).clone()
    Hd, dead = damped_hessian(H.detach().to(W.device, dtype), damp)
    Wf[:, dead] = 0  # an input that is always zero: SparseGPT zeroes its weights
    U = _hinv_upper(Hd, damp)
    pruned = torch.zeros(o, i, dtype=torch.bool, device=W.device)
    loss = torch.zeros(o, dtype=dtype, device=W.device)

    for i1 in range(0, i, blocksize):
        i2 = min(i1 + blocksize, i)
        W1 = Wf[:, i1:i2].clone()  # (o, b) the block, updated column by column
        U1 = U[i1:i2, i1:i2]  # (b, b)
        d = U1.diagonal()  # (b,)
        P1 = torch.zeros_like(W1, dtype=torch.bool)  # (o, b) True = pruned
        if m == 0:  # unstructured: lowest saliency over the whole block at once
            k = round(sparsity * W1.numel())
            if k:
                P1.view(-1)[torch.topk((W1**2 / d**2).flatten(), k, largest=False).indices] = True
        Err1 = torch.zeros_like(W1)  # (o, b) err_j of every column, for the lazy update
        for j in range(i2 - i1):
            if m and j % m == 0:  # N:M / C_4^n: choose the group's mask from the updated weights
                P1[:, j : j + m] = _prune_groups(W1[:, j : j + m], d[j : j + m], n, m)
            w = W1[:, j]  # (o,)
            q = torch.where(P1[:, j], 0.0, w)
            err = (w - q) / d[j]
            loss += err**2
            W1[:, j:] -= err[:, None] * U1[j, j:]  # OBS update of the block's later columns
            W1[:, j] = q  # exact: the update leaves w − err·d = q only up to rounding
            Err1[:, j] = err
        Wf[:, i1:i2] = W1
        pruned[:, i1:i2] = P1
        Wf[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the columns after the block
    return Wf, pruned, loss, Hd


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    damp: float = 0.01,
    debug: bool = False,
    n_removed_per_row: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (o, i) with SparseGPT; returns (Ŵ in W's dtype, mask (o, i) bool, True = kept).

    H (i, i) is XᵀX of the layer's calibration inputs (any positive scale). Exactly one pattern:
    ``sparsity`` (unstructured, fraction removed per o×blocksize block), ``prune_n``/``prune_m``
    (remove prune_n of every prune_m contiguous weights: 2:4 is prune_n=2, prune_m=4), or
    ``n_removed_per_row`` (o,) ints in 0..M (C_4^n, M = prune_m or 4). Ŵ is exactly zero where mask
    is False; weights of dead inputs (diag H = 0) are zeroed as in SparseGPT. ``damp`` is the
    fraction of mean(diag H) added to the diagonal (0.01 in the paper). Computes in ``dtype``
    (float32, or float64) on W's device. ``debug`` prints one line with the relative reconstruction
    error ‖XWᵀ − XŴᵀ‖²/‖XWᵀ‖² of plain masking with the chosen mask and of SparseGPT's Ŵ.
    """
    check_layer(W, H)
    if dtype not in (torch.float32, torch.float64):
        raise SparsambaError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    o, i = W.shape
    m, n = _check_args(o, sparsity, prune_n, prune_m, blocksize, n_removed_per_row, W.device)
    tick = time.perf_counter()
    Wf, pruned, loss, _ = _obs_prune(W, H, sparsity, m, n, blocksize, damp, dtype)
    mask = ~pruned
    if debug:
        what = f"{sparsity:.0%} unstructured" if m == 0 else f"n/{m} mean n {n.float().mean().item():.2f}"
        print(
            f"sparsegpt {tuple(W.shape)} {what}: sparsity {pruned.float().mean().item():.1%}, rel. reconstruction "
            f"error masked {reconstruction_error(W, W * mask, H):.4g} -> sparsegpt "
            f"{reconstruction_error(W, Wf, H):.4g} (OBS loss {loss.sum().item():.4g}, "
            f"{time.perf_counter() - tick:.2f} s)"
        )
    return Wf.to(W.dtype), mask


def sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern | str,
    sparsity: float | None = None,
    n_removed_per_row: torch.Tensor | None = None,
    **kw,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparsegpt_prune`` under a ``Pattern`` (or its spec, parsed by ``parse_pattern``):
    unstructured (with ``sparsity``), N:M (keeps N of every M: 2:4, 4:8), c4n1..c4n3 (removes n of
    every 4), or c4 (with ``n_removed_per_row``). Other keywords go to ``sparsegpt_prune``. Returns
    (Ŵ, mask)."""
    p = parse_pattern(pattern)
    if p.kind == "unstructured":
        if sparsity is None:
            raise SparsambaError("pattern 'unstructured' needs a sparsity (fraction of weights removed)")
        return sparsegpt_prune(W, H, sparsity=sparsity, **kw)
    if p.kind == "c4":
        if n_removed_per_row is None:
            raise SparsambaError("pattern 'c4' needs n_removed_per_row (one n in 0..4 per row)")
        return sparsegpt_prune(W, H, n_removed_per_row=n_removed_per_row, prune_m=4, **kw)
    return sparsegpt_prune(W, H, sparsity=sparsity, prune_n=p.n_removed, prune_m=p.group, **kw)
