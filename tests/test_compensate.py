import numpy as np
import pytest
import torch

from sparsamba.errors import SparsambaError
from sparsamba.prune.compensate import compensate, compensate_ref, damped_hessian, reconstruction_error


def layer(o=24, i=32, tokens=256, seed=0, dtype=torch.float64):
    """(W (o, i), X (tokens, i), H = XᵀX): X has correlated columns, else compensation has nothing to do."""
    g = torch.Generator().manual_seed(seed)
    X = (
        torch.randn(tokens, i, generator=g, dtype=dtype)
        @ torch.randn(i, i, generator=g, dtype=dtype)
        / i**0.5
    )
    W = torch.randn(o, i, generator=g, dtype=dtype)
    return W, X, X.T @ X


def c4n_mask(n: torch.Tensor, i: int, seed=0) -> torch.Tensor:
    """(o, i) C_4^n mask with a random choice of the n removed in each group of 4; True = kept."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.rand(len(n), i // 4, 4, generator=g).argsort(-1).argsort(-1)
    return (rank >= n[:, None, None]).reshape(len(n), i)


def mixed_mask(o=40, i=32, seed=0):
    """Per-row n in 0..4, ten rows sharing one mask (the shared-factorisation path), the rest unique
    (the batched path), with rows solved over kept columns (n >= 2) and through H⁻¹ (n = 1)."""
    n = torch.arange(o) % 5
    mask = c4n_mask(n, i, seed)
    mask[o - 10 :] = mask[1]  # n = 1: shared, OBS route
    mask[o - 20 : o - 10] = mask[3]  # n = 3: shared, kept route
    return mask


def test_compensate_equals_least_squares_per_row():
    W, X, H = layer(o=40)
    for mask in (mixed_mask(), torch.rand(40, 32, generator=torch.Generator().manual_seed(1)) < 0.6):
        Wn = compensate(W, H, mask, damp=0.0)
        Xn, Wn = X.numpy(), Wn.numpy()
        for r in range(W.shape[0]):
            k = mask[r].numpy()
            if k.any():
                # argmin_v ‖X w_r − X_k v‖ by numpy's SVD-based solver (torch's batched LAPACK calls on tiny
                # matrices were 100x slower here with the other core busy)
                v = np.linalg.lstsq(Xn[:, k], Xn @ W[r].numpy(), rcond=None)[0]
                np.testing.assert_allclose(Wn[r, k], v, rtol=1e-8, atol=1e-9, err_msg=f"row {r}")
            assert (Wn[r, ~k] == 0).all()


def test_obs_formula_equals_kept_columns_solve():
    W, _, H = layer(o=1, i=8, tokens=64)
    w = W[0]
    Hd = H + 0.001 * H.diagonal().mean() * torch.eye(8, dtype=H.dtype)
    q = torch.tensor([1, 2, 6])
    k = torch.tensor([0, 3, 4, 5, 7])
    Hinv = torch.linalg.inv(Hd)
    dw = -w[q] @ torch.linalg.inv(Hinv[q][:, q]) @ Hinv[q]  # δw = −w_q (H⁻¹_qq)⁻¹ H⁻¹_q,:
    v = torch.linalg.solve(Hd[k][:, k], Hd[k] @ w)  # H_kk v = H_k,: w
    torch.testing.assert_close((w + dw)[k], v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((w + dw)[q], torch.zeros(3, dtype=w.dtype), rtol=0, atol=1e-12)
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, q] = False
    torch.testing.assert_close(compensate(W, H, mask)[0, k], v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compensate_ref(W, H, mask)[0, k], v, rtol=1e-10, atol=1e-12)


def test_fast_path_float32_matches_reference():
    W, _, H = layer(o=40, tokens=512, seed=2)
    mask = mixed_mask(seed=2)
    ref = compensate_ref(W, H, mask)  # float64, row by row
    got = compensate(W.float(), H.float(), mask)
    assert got.dtype == torch.float32
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-4, err


@pytest.mark.parametrize("seed", range(4))
def test_compensation_never_increases_reconstruction_error(seed):
    W, _, H = layer(o=32, seed=seed)
    n = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(seed))
    mask = c4n_mask(n, 32, seed)
    Wn = compensate(W, H, mask)
    masked, after = reconstruction_error(W, W * mask, H), reconstruction_error(W, Wn, H)
    assert after <= masked + 1e-12
    partial = (n > 0) & (n < 4)  # rows with something both pruned and kept improve strictly
    assert reconstruction_error(W[partial], Wn[partial], H) < 0.9 * reconstruction_error(
        W[partial], (W * mask)[partial], H
    )


def test_exact_zeros_dense_rows_and_dtype():
    W, _, H = layer(o=40)
    mask = mixed_mask()
    Wn = compensate(W.half(), H.float(), mask)
    assert Wn.dtype == torch.float16 and (Wn[~mask] == 0).all()
    Wn = compensate(W, H, mask)
    dense, empty = mask.all(1), ~mask.any(1)
    assert dense.any() and empty.any()
    torch.testing.assert_close(Wn[dense], W[dense], rtol=0, atol=0)
    assert (Wn[empty] == 0).all()


def test_reconstruction_error_is_relative_output_error():
    W, X, H = layer()
    W2 = W + 0.1 * torch.randn_like(W)
    direct = ((X @ W.T - X @ W2.T).norm() ** 2 / (X @ W.T).norm() ** 2).item()
    assert reconstruction_error(W, W2, H) == pytest.approx(direct, rel=1e-10)
    assert reconstruction_error(W, W, H) == 0.0


def test_dead_inputs():
    W, X, _ = layer()
    X[:, [3, 17]] = 0
    H = X.T @ X
    mask = mixed_mask(o=24)
    Wn = compensate(W, H, mask)
    assert torch.isfinite(Wn).all()
    dead_kept = mask[:, [3, 17]]
    torch.testing.assert_close(Wn[:, [3, 17]][dead_kept], W[:, [3, 17]][dead_kept])  # decoupled: unchanged
    assert reconstruction_error(W, Wn, H) <= reconstruction_error(W, W * mask, H)
    Hz = torch.zeros(32, 32, dtype=torch.float64)  # no signal at all: masking is all that is left
    torch.testing.assert_close(compensate(W, Hz, mask), W * mask)


def test_bad_inputs_raise():
    W, _, H = layer()
    mask = mixed_mask(o=24)
    bad = H.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(SparsambaError, match="NaN"):
        compensate(W, bad, mask)
    with pytest.raises(SparsambaError, match="calibration data"):
        compensate(W, -H, mask)
    with pytest.raises(SparsambaError, match="bool"):
        compensate(W, H, mask.float())
    with pytest.raises(SparsambaError, match="shape"):
        compensate(W, H, mask[:, :16])
    with pytest.raises(SparsambaError, match=r"\(32, 32\)"):
        compensate(W, H[:16, :16], mask)
    with pytest.raises(SparsambaError, match="damp"):
        damped_hessian(H, -1.0)


def test_debug_line(capsys):
    W, _, H = layer()
    compensate(W, H, mixed_mask(o=24), debug=True, name="layers.0.mixer.in_proj")
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        len(out) == 1
        and "layers.0.mixer.in_proj" in out[0]
        and "masked" in out[0]
        and "compensated" in out[0]
    )
