"""Packed format v2 of one matrix (docs/packed-format.md, "Matrix blob"): the numpy writer against its
reader, the size formulas, and a plan's layers packed into blobs that compute the plan's weights. The C
kernels that read these blobs are tests/test_kernels.py's."""

from __future__ import annotations

import numpy as np
import pytest

from sparsamba.compile.packed_v2 import DTYPES, dense_of, pack_matrix, quantise_activations, unpack_matrix

SHAPES = [
    (1, 20),
    (3, 33),
    (5, 17),
    (48, 40),
    (63, 19),
    (64, 50),
    (65, 33),
    (200, 70),
    (1000, 24),
    (2049, 37),
    (3000, 21),
]


def random_classes(rng, out: int, K: int):
    """A random C_4^n matrix (n per row in 0..4) as the packer's classes and its dense fp32 form."""
    G = -(-K // 4)
    n = rng.integers(0, 5, out)
    W = rng.standard_normal((out, 4 * G)).astype(np.float32)
    keep = np.ones((out, G, 4), bool)
    for r in range(out):
        for g in range(G):
            keep[r, g, rng.permutation(4)[: n[r]]] = False
    W *= keep.reshape(out, -1)
    keep = keep.reshape(out, -1)
    classes = [(c, np.flatnonzero(n == c), keep[n == c], W[n == c, :K]) for c in range(4) if (n == c).any()]
    return classes, W[:, :K]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pack_unpack_round_trip(dtype):
    rng = np.random.default_rng(1)
    for K, out in SHAPES:
        classes, W = random_classes(rng, out, K)
        m = unpack_matrix(pack_matrix(out, K, classes, dtype))
        got = dense_of(m)
        if dtype == "f32":
            assert np.array_equal(got, W), (K, out)
        elif dtype == "f16":
            assert np.array_equal(got, W.astype(np.float16).astype(np.float32)), (K, out)
        else:  # within half a quantisation step of each row's largest weight
            step = np.abs(W).max(1, keepdims=True) / 127
            assert (np.abs(got - W) <= 0.5001 * step).all(), (K, out)
        for c, (n, rows, keep, _) in zip(m.classes, classes):
            assert c.n == n and np.array_equal(c.rows, rows) and np.array_equal(c.keep, keep)


def test_sizes_are_the_formulas_and_well_under_csr():
    from sparsamba.compile.packed_v2 import matrix_bytes

    rng = np.random.default_rng(2)
    for K, out in SHAPES:
        classes, W = random_classes(rng, out, K)
        for dtype, dt in DTYPES.items():
            blob = pack_matrix(out, K, classes, dtype)
            assert len(blob) == matrix_bytes(K, dt, {c[0]: len(c[1]) for c in classes})
    # 768 x 768 at n = 2 everywhere, f16: values + 2-bit codes + padding, against CSR's 6 bytes per weight
    keep = np.tile(np.array([True, True, False, False]), (768, 192))
    blob = pack_matrix(768, 768, [(2, np.arange(768), keep, np.ones((768, 768), np.float32) * keep)], "f16")
    assert len(blob) < 0.45 * (768 * 384 * 6 + 769 * 4)


@pytest.mark.parametrize("dtype", ["f32", "int8"])
def test_a_plans_layers_pack_to_what_they_compute(tmp_path, dtype):
    """Every layer of a reordered plan (dense layers and mixed classes, odd shapes) packs into a blob that
    unpacks to the plan's own weights; matvec is the product the engine's kernels compute."""
    import torch
    from conftest import PRUNED_CONFIGS, random_pruned

    from sparsamba.compile.packed_v2 import matvec, pack_plan_linear
    from sparsamba.compile.passes import reorder
    from sparsamba.compile.plan import dense_rows, plan_from_model

    plan = reorder(plan_from_model(random_pruned(tmp_path / "m", seed=3, **PRUNED_CONFIGS["d18"])))
    rng = np.random.default_rng(0)
    for b in plan.blocks:
        for k, lp in b.linears.items():
            m = unpack_matrix(pack_plan_linear(lp, dtype, k))
            W, want = dense_of(m), dense_rows(lp).numpy()
            if dtype == "f32":
                assert np.array_equal(W, want), k
            else:
                assert np.abs(W - want).max() <= 0.5001 * np.abs(want).max() / 127, k
            x = rng.standard_normal((2, lp.in_features)).astype(np.float32)
            xe = quantise_activations(x) if dtype == "int8" else x
            ref = torch.from_numpy(xe) @ torch.from_numpy(W).T
            assert np.allclose(matvec(m, W, x), ref.numpy(), rtol=1e-5, atol=1e-6), k
