"""Per-weight scores against their definitions computed the plain way."""

import pytest
import torch

from sparsamba.errors import SparsambaError
from sparsamba.prune.scores import hessian_damped, magnitude, obs_saliency, wanda


def layer(out: int = 6, n_in: int = 12, tokens: int = 50, seed: int = 0):
    """W (out, in) and calibration inputs X (tokens, in) with features of different scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n_in, generator=g)
    X = torch.randn(tokens, n_in, generator=g) * torch.linspace(0.1, 3.0, n_in)
    return W, X


def test_magnitude():
    W = torch.tensor([[-2.0, 0.0, 3.5], [1.0, -0.25, -0.0]])
    assert torch.equal(magnitude(W), torch.tensor([[2.0, 0.0, 3.5], [1.0, 0.25, 0.0]]))


def test_wanda_with_unit_norms_is_magnitude():
    W, _ = layer()
    assert torch.equal(wanda(W, torch.ones(12)), magnitude(W))


def test_wanda_scales_each_input_column_by_its_activation_norm():
    W, X = layer()
    x_norm = X.norm(dim=0)  # (in,) ‖X_j‖₂ over the tokens
    S = wanda(W, x_norm)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            assert S[i, j].item() == pytest.approx(abs(W[i, j].item()) * x_norm[j].item(), rel=1e-6)
    assert wanda(W.half(), x_norm).dtype == torch.float16


def test_wanda_rejects_a_wrong_norm_shape():
    W, _ = layer()
    with pytest.raises(SparsambaError, match=r"x_norm must be \(12,\)"):
        wanda(W, torch.ones(6))


def test_hessian_damped():
    _, X = layer()
    H = X.T @ X
    before = H.clone()
    Hd = hessian_damped(H, 0.01)
    lam = 0.01 * torch.diagonal(H).mean()
    assert torch.allclose(Hd, H + lam * torch.eye(12), rtol=0, atol=1e-6)
    assert torch.equal(H, before)  # not modified in place
    assert Hd.dtype == H.dtype
    assert torch.equal(hessian_damped(H, 0.0), H)


@pytest.mark.parametrize(
    "H, damp, words",
    [
        (torch.ones(3, 4), 0.01, "square"),
        (torch.ones(4), 0.01, "square"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 0.01, "NaN or inf"),
        (torch.tensor([[1.0, 0.0], [0.0, float("inf")]]), 0.01, "NaN or inf"),
        (torch.eye(2), -0.1, ">= 0"),
        (torch.eye(2), float("nan"), ">= 0"),
    ],
)
def test_hessian_damped_errors(H, damp, words):
    with pytest.raises(SparsambaError, match=words):
        hessian_damped(H, damp)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_obs_saliency_against_a_direct_inverse(dtype, rtol):
    W, X = layer()
    H = X.T @ X
    Hd = H.double() + 0.01 * torch.diagonal(H.double()).mean() * torch.eye(12, dtype=torch.float64)
    ref = W.double() ** 2 / torch.diagonal(torch.linalg.inv(Hd))  # W_ij² / [H_d⁻¹]_jj
    got = obs_saliency(W.to(dtype), H.to(dtype))
    assert got.dtype == dtype and got.shape == W.shape
    assert torch.allclose(got.double(), ref, rtol=rtol, atol=0)


def test_obs_saliency_of_a_diagonal_hessian():
    W = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    H = torch.diag(torch.tensor([1.0, 4.0, 7.0], dtype=torch.float64))
    lam = 0.1 * 4.0  # damp · mean(diag)
    # independent features: [H_d⁻¹]_jj = 1 / (H_jj + λ), so the saliency is W_ij² (H_jj + λ)
    expected = W**2 * torch.tensor([1.0 + lam, 4.0 + lam, 7.0 + lam], dtype=torch.float64)
    assert torch.allclose(obs_saliency(W, H, damp=0.1), expected, rtol=1e-12, atol=0)


def test_obs_saliency_survives_dead_and_collinear_features_thanks_to_damping():
    W, X = layer(tokens=5)  # 5 tokens, 12 features: XᵀX has rank 5
    X[:, 3] = 0.0  # a dead feature
    S = obs_saliency(W, X.T @ X)
    assert torch.isfinite(S).all() and (S >= 0).all()


@pytest.mark.parametrize(
    "H, words",
    [
        (torch.zeros(4, 4), "not positive definite"),  # mean(diag) = 0: damping adds nothing
        (-torch.eye(4), "not positive definite"),
        (torch.full((4, 4), float("nan")), "NaN or inf"),
        (torch.eye(3), r"H must be \(4, 4\)"),
    ],
)
def test_obs_saliency_errors(H, words):
    with pytest.raises(SparsambaError, match=words):
        obs_saliency(torch.ones(2, 4), H)
