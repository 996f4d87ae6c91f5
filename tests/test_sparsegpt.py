import pytest
import torch

from sparsamba.errors import SparsambaError
from sparsamba.prune.compensate import reconstruction_error
from sparsamba.prune.sparsegpt import _obs_prune, sparsegpt, sparsegpt_prune


def layer(o=32, i=64, tokens=512, seed=0, dtype=torch.float64):
    """(W (o, i), X (tokens, i), H = XᵀX): X = Z R diag(s), correlated columns of log-normal scales s, like
    real activations (with i.i.d. columns OBS has nothing to exploit and selects by magnitude)."""
    g = torch.Generator().manual_seed(seed)
    X = (
        torch.randn(tokens, i, generator=g, dtype=dtype)
        @ torch.randn(i, i, generator=g, dtype=dtype)
        / i**0.5
    )
    X = X * torch.exp(0.5 * torch.randn(i, generator=g, dtype=dtype))
    W = torch.randn(o, i, generator=g, dtype=dtype)
    return W, X, X.T @ X


def removed_per_group(mask: torch.Tensor, m: int) -> torch.Tensor:
    return (~mask).reshape(mask.shape[0], -1, m).sum(-1)  # (o, i/m)


def magnitude_nm(W: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep all but the n smallest |w| of each group of m (True = kept)."""
    o, i = W.shape
    order = W.abs().reshape(o, i // m, m).argsort(-1)
    keep = torch.ones(o, i // m, m, dtype=torch.bool).scatter_(-1, order[..., :n], False)
    return keep.reshape(o, i)


def naive_sparsegpt_nm(W, H, n: int, m: int, damp=0.01):
    """One column at a time, re-inverting H over the columns not yet fixed: no Cholesky, no blocks."""
    W = W.clone()
    Hd = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    i = W.shape[1]
    dsq = torch.stack([torch.linalg.inv(Hd[c:, c:])[0, 0] for c in range(i)])  # d_c² = [(Hd_FF)⁻¹]_cc
    keep = torch.ones_like(W, dtype=torch.bool)
    for c in range(i):
        if c % m == 0:
            sal = W[:, c : c + m] ** 2 / dsq[c : c + m]
            keep[:, c : c + m].scatter_(1, sal.argsort(1)[:, :n], False)
        Finv = torch.linalg.inv(Hd[c:, c:])  # (H_FF)⁻¹, F = columns c..
        q = torch.where(keep[:, c], W[:, c], 0.0)
        W[:, c:] -= ((W[:, c] - q) / Finv[0, 0])[:, None] * Finv[0]  # OBS: optimal fix of the rest
        W[:, c] = q
    return W, keep


def test_matches_naive_obs():
    W, _, H = layer(o=6, i=16, tokens=64)
    ref, keep = naive_sparsegpt_nm(W, H, 2, 4)
    got, mask = sparsegpt_prune(W, H, prune_n=2, prune_m=4, blocksize=8, dtype=torch.float64)
    assert torch.equal(mask, keep)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_lazy_batch_update_does_not_change_the_result():
    W, _, H = layer()
    a, ma = sparsegpt_prune(W, H, prune_n=2, prune_m=4, blocksize=4, dtype=torch.float64)
    b, mb = sparsegpt_prune(W, H, prune_n=2, prune_m=4, blocksize=64, dtype=torch.float64)
    assert torch.equal(ma, mb)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_obs_loss_equals_quadratic_error():
    """Σ err_j² over the run = (w − ŵ)ᵀ Hd (w − ŵ) summed over rows: the OBS updates are exact."""
    W, _, H = layer()
    for sparsity, m, n in ((0.5, 0, None), (None, 4, torch.randint(0, 5, (32,)))):
        Wp, pruned, loss, Hd = _obs_prune(W, H, sparsity, m, n, 16, 0.01, torch.float64)
        D = W - Wp
        torch.testing.assert_close(loss, ((D @ Hd) * D).sum(1), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("c4n1", 1, 4), ("c4n3", 3, 4)])
def test_nm_structure_is_exact(pattern, n, m):
    W, _, H = layer()
    Wp, mask = sparsegpt(W.float(), H.float(), pattern)
    assert Wp.dtype == torch.float32 and (Wp[~mask] == 0).all()
    assert (removed_per_group(mask, m) == n).all()
    Wp2, mask2 = sparsegpt_prune(W.float(), H.float(), prune_n=n, prune_m=m)
    assert torch.equal(mask, mask2) and torch.equal(Wp, Wp2)


def test_per_row_c4n_structure():
    W, _, H = layer()
    n = torch.arange(32) % 5
    W, H = W.float(), H.float()
    Wp, mask = sparsegpt_prune(W, H, n_removed_per_row=n)
    assert (removed_per_group(mask, 4) == n[:, None]).all()
    assert (Wp[~mask] == 0).all()
    torch.testing.assert_close(Wp[n == 0], W[n == 0], rtol=0, atol=0)  # nothing pruned, nothing to move
    assert (Wp[n == 4] == 0).all()
    Wp2, mask2 = sparsegpt(W, H, "c4", n_removed_per_row=n)
    assert torch.equal(mask, mask2)


def test_short_last_group_counts_padding_first():
    W, _, H = layer(i=10)  # groups 0-3, 4-7 and 8-9 (+2 zero pads, removed first)
    _, mask = sparsegpt(W, H, "2:4")
    assert (removed_per_group(mask[:, :8], 4) == 2).all() and mask[:, 8:].all()
    _, mask = sparsegpt(W, H, "c4n3")
    assert ((~mask[:, 8:]).sum(1) == 1).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_sparsity_per_block(sparsity):
    W, _, H = layer(o=16, i=256)
    Wp, mask = sparsegpt_prune(W, H, sparsity=sparsity, blocksize=128)
    for b in range(2):  # each 16 × 128 block prunes round(sparsity · 2048)
        assert (~mask[:, 128 * b : 128 * (b + 1)]).sum().item() == round(sparsity * 16 * 128)
    assert (Wp[~mask] == 0).all()
    rows = (~mask).sum(1)
    assert rows.min() < rows.max()  # the selection is per block, not per row


def test_identity_hessian_selects_by_magnitude():
    W, _, _ = layer()
    eye = torch.eye(64, dtype=W.dtype)
    Wp, mask = sparsegpt(W, eye, "2:4")
    assert torch.equal(mask, magnitude_nm(W, 2, 4))
    torch.testing.assert_close(Wp, W * mask)  # H = I: nothing to compensate with
    Wp, mask = sparsegpt_prune(W, eye, sparsity=0.5, blocksize=32)
    for b in range(2):
        blk = W[:, 32 * b : 32 * (b + 1)].abs()
        thresh = blk.flatten().sort().values[blk.numel() // 2]
        assert torch.equal(mask[:, 32 * b : 32 * (b + 1)], blk >= thresh)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_beats_magnitude_on_correlated_inputs(pattern):
    W, X, H = layer(o=64, i=128, tokens=1024, seed=3)
    Wp, mask = sparsegpt(W.float(), H.float(), pattern, sparsity=0.5)
    if pattern == "2:4":
        mag = magnitude_nm(W, 2, 4)
    else:
        mag = W.abs() >= W.abs().flatten().kthvalue(W.numel() // 2 + 1).values
    err_mag = reconstruction_error(W, W * mag, H)
    err_same_mask = reconstruction_error(W, W * mask, H)
    err = reconstruction_error(W, Wp.double(), H)
    assert err < 0.6 * err_mag, (err, err_mag)
    assert err < 0.8 * err_same_mask, (err, err_same_mask)
    direct = ((X @ W.T - X @ Wp.double().T).norm() ** 2 / (X @ W.T).norm() ** 2).item()
    assert err == pytest.approx(direct, rel=1e-6)


def test_dead_inputs():
    W, X, _ = layer()
    X[:, [5, 40]] = 0
    H = X.T @ X
    Wp, mask = sparsegpt(W, H, "2:4")
    assert torch.isfinite(Wp).all() and (Wp[:, [5, 40]] == 0).all()  # zeroed, as SparseGPT does
    assert (removed_per_group(mask, 4) == 2).all()
    Wp, mask = sparsegpt_prune(W, torch.zeros_like(H), sparsity=0.5)  # all dead
    assert (Wp == 0).all() and (~mask).float().mean() == 0.5


def test_dtypes():
    W, _, H = layer()
    Wp, _ = sparsegpt(W.half(), H.float(), "2:4")
    assert Wp.dtype == torch.float16
    a, _ = sparsegpt(W.float(), H.float(), "2:4", dtype=torch.float64)
    b, _ = sparsegpt(W.float(), H.float(), "2:4")
    assert a.dtype == torch.float32 and (a - b).abs().max() < 1e-3


def test_bad_hessian_raises():
    W, _, H = layer()
    bad = H.clone()
    bad[3, 3] = float("inf")
    with pytest.raises(SparsambaError, match="NaN or inf"):
        sparsegpt(W, bad, "2:4")
    indefinite = H - 2 * H.diagonal().mean() * torch.eye(64, dtype=H.dtype)
    with pytest.raises(SparsambaError, match="calibration data"):
        sparsegpt(W, indefinite, "2:4")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(), "give sparsity"),
        (dict(sparsity=1.5), r"\[0, 1\]"),
        (dict(prune_n=5, prune_m=4), "prune_n must be"),
        (dict(prune_n=2), "prune_m"),
        (dict(prune_n=2, prune_m=4, sparsity=0.3), "contradicts"),
        (dict(prune_n=2, prune_m=3), "multiple of the group size"),
        (dict(n_removed_per_row=torch.full((32,), 5)), r"0\.\.4"),
        (dict(n_removed_per_row=torch.zeros(31, dtype=torch.long)), "shape"),
        (dict(n_removed_per_row=torch.zeros(32), prune_n=2, prune_m=4), "not both"),
    ],
)
def test_bad_arguments_raise(kw, match):
    W, _, H = layer()
    with pytest.raises(SparsambaError, match=match):
        sparsegpt_prune(W, H, **kw)


@pytest.mark.parametrize("pattern", ["3:2", "2-4", "c4n5", "c4", "unstructured"])
def test_bad_pattern_strings_raise(pattern):
    W, _, H = layer()
    with pytest.raises(SparsambaError):
        sparsegpt(W, H, pattern)


def test_debug_line(capsys):
    W, _, H = layer()
    sparsegpt(W, H, "2:4", debug=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "reconstruction error" in out[0] and "masked" in out[0]
