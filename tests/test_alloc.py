"""The loss-aware allocation (alloc.py), the dense-target solve (dense_target.py), the straight-through
learning (learn.py) and the new prune options end to end on a tiny model."""

import itertools

import pytest
import torch
from test_prune import _llama, _mamba1, _windows

from sparsamba.errors import SparsambaError
from sparsamba.prune.alloc import allocate, allocate_scoped, row_errors
from sparsamba.prune.compensate import compensate
from sparsamba.prune.dense_target import dense_target_weights
from sparsamba.prune.learn import LearnConfig, fixup, learn_logits
from sparsamba.prune.pattern import removed_per_row
from sparsamba.prune.run import PruneConfig, prune_model

QUIET = dict(progress=False, log=lambda *_: None)


def _brute(c: torch.Tensor, budget: float) -> float:
    return min(
        sum(float(c[r, k[r]]) for r in range(len(c)))
        for k in itertools.product(range(5), repeat=len(c))
        if sum(k) >= budget
    )


def test_allocate_is_optimal_on_convex_curves_and_meets_the_budget_exactly():
    g = torch.Generator().manual_seed(0)
    gain = torch.arange(5.0)[None].expand(5, 5)
    for _ in range(10):
        c = torch.rand(5, 4, generator=g, dtype=torch.float64).sort(1).values.cumsum(1)  # convex
        c = torch.cat([torch.zeros(5, 1, dtype=torch.float64), c], 1)
        for budget in (3, 7, 10, 16):
            n, _ = allocate(c, gain, budget)
            assert int(n.sum()) == budget  # unit steps: exact
            assert float(c.gather(1, n[:, None]).sum()) <= _brute(c, budget) + 1e-9


def test_allocate_on_non_convex_curves():
    # row 0: removing the whole row is cheaper than any partial step; row 1 linear
    c = torch.tensor([[0.0, 5.0, 6.0, 7.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    n, _ = allocate(c, torch.arange(5.0)[None], 4)
    assert n.tolist() == [4, 0]
    g = torch.Generator().manual_seed(4)
    for _ in range(10):  # random curves: within budget, at most one row's step over it
        c = torch.rand(6, 5, generator=g, dtype=torch.float64)
        c[:, 0] = 0
        n, _ = allocate(c, torch.arange(5.0)[None], 11)
        assert 11 <= int(n.sum()) <= 11 + 3


def test_allocate_gives_back_when_the_free_choice_overshoots():
    # the fix-up's costs (−log p, 0 at the argmax): here every row's free choice is n = 4
    c = torch.ones(6, 5, dtype=torch.float64)
    c[:, 4] = 0
    n, _ = allocate(c, torch.arange(5.0)[None], 10)
    assert int(n.sum()) == 10


def test_block_scope_meets_each_block_and_global_is_no_worse():
    g = torch.Generator().manual_seed(1)
    costs = [torch.rand(8, 5, generator=g, dtype=torch.float64).cumsum(1) * s for s in (1, 1, 10)]
    for c in costs:
        c[:, 0] = 0
    gains = [torch.arange(5.0, dtype=torch.float64)[None]] * 3
    ns, _ = allocate_scoped(costs, gains, [0, 0, 1], 0.5)
    assert int(ns[0].sum() + ns[1].sum()) == 32 and int(ns[2].sum()) == 16
    ng, _ = allocate_scoped(costs, gains, [0, 0, 0], 0.5)
    assert int(sum(n.sum() for n in ng)) == 48
    assert int(ng[2].sum()) < 16  # the expensive layer is spared when the budget is global

    def total(ns):
        return sum(float(c.gather(1, n[:, None]).sum()) for c, n in zip(costs, ns))

    assert total(ng) <= total(ns)


def test_row_errors_match_reconstruction():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(400, 16, generator=g, dtype=torch.float64)
    W = torch.randn(3, 16, generator=g, dtype=torch.float64)
    H = X.T @ X
    mask = torch.rand(3, 16, generator=g) > 0.5
    Wn = torch.stack([W, compensate(W, H, mask), W * 0, W * 0, W * 0])
    e = row_errors(W, Wn, H)
    assert torch.allclose(e[:, 1], ((X @ (W - Wn[1]).T) ** 2).sum(0))
    assert torch.allclose(e[:, 4], ((X @ W.T) ** 2).sum(0))


def test_dense_target_is_exact_least_squares():
    g = torch.Generator().manual_seed(3)
    Xd = torch.randn(2000, 24, generator=g, dtype=torch.float64)
    Xp = Xd + 0.3 * torch.randn(2000, 24, generator=g, dtype=torch.float64)
    W = torch.randn(4, 24, generator=g, dtype=torch.float64)
    assert torch.allclose(dense_target_weights(W, Xd.T @ Xd, Xd.T @ Xd, 0.001), W)
    mask = torch.rand(4, 24, generator=g) > 0.5
    H = Xp.T @ Xp
    v = compensate(dense_target_weights(W, H, Xp.T @ Xd, 0.0), H, mask, damp=0.0)
    for r in range(4):
        k = mask[r].nonzero().flatten()
        ls = torch.linalg.lstsq(Xp[:, k], Xd @ W[r]).solution  # min ‖X_p,k v − X_d w‖
        assert torch.allclose(v[r, k], ls, atol=1e-8)


def _learn_one_layer(m, w, mod, target: float, start: int, lift: float, cfg: LearnConfig):
    """learn_logits on one layer whose five candidates drop a random k/4 of the weights; every row's
    logit of n = start lifted by `lift`. Returns (logits, gains, diagnostics)."""
    W = mod.weight.detach()
    g = torch.Generator().manual_seed(0)
    cand = torch.stack([W * (torch.rand(W.shape, generator=g) >= k / 4) for k in range(5)])  # (5, out, in)
    gains = torch.arange(5.0) * W.shape[1] / 4
    logits = {"o": torch.zeros(W.shape[0], 5)}
    logits["o"][:, start] = lift
    diag = learn_logits(
        m, w, {"o": mod}, {"o": cand}, logits, {"o": gains}, target, cfg, progress=False, log=lambda *_: None
    )
    return logits, gains, diag


def test_straight_through_learning_moves_the_logits_with_the_target():
    m, w = _mamba1(), _windows()
    mod = m.backbone.layers[0].mixer.out_proj
    W = mod.weight.detach()
    got = {}
    for target, start in ((0.1, 4), (0.9, 0)):  # start: the n favoured by 1.0 over the others
        logits, _, diag = _learn_one_layer(
            m, w, mod, target, start, 1.0, LearnConfig(steps=30, lr=0.2, batch_size=2)
        )
        assert logits["o"].abs().mean() > 0.2 and not logits["o"].requires_grad
        got[target] = diag["expected_after"]
    assert torch.equal(mod.weight, W)  # weights untouched, the class's forward back
    # from 0.66 (favouring n = 4) and 0.33 (favouring n = 0) toward each target
    assert got[0.1] < 0.66 - 0.1 and got[0.9] > 0.33 + 0.2


def test_learning_meets_the_target_from_either_side_before_the_fix_up():
    """The constraint is an equality on the hard choice: from a start past the target (every row at
    n = 2, 50%, for a 30% target) and from one short of it (n = 1 for 50%), the learned distribution
    ends at the target, its argmax and its expectation, so the fix-up moves few rows. The former
    one-sided price (λ > 0 on s* − E[s]) ended at E[s] 0.39 and 0.63 here, the fix-up moving 23%."""
    m, w = _mamba1(), _windows()
    mod = m.backbone.layers[0].mixer.in_proj  # (128, 32)
    for target, start in ((0.3, 2), (0.5, 1)):  # p(start) = 0.5
        cfg = LearnConfig(steps=100, lr=0.1, batch_size=2)
        logits, gains, diag = _learn_one_layer(m, w, mod, target, start, 1.4, cfg)
        assert abs(diag["argmax_after"] - target) < 0.03, diag
        assert abs(diag["expected_after"] - target) < 0.04, diag
        _, moved = fixup(logits, {"o": gains}, {"o": 0}, target, 1)
        assert moved < 0.05, (target, moved)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(temperature=0.0), r"temperature must be in \(0, 1\]"),
        (dict(temperature=1.5), r"temperature must be in \(0, 1\]"),
        (dict(penalty=-1.0), "penalty must be a finite number >= 0"),
        (dict(penalty=float("inf")), "penalty must be a finite number >= 0"),
    ],
)
def test_learn_config_is_checked(kw, msg):
    with pytest.raises(SparsambaError, match=msg):
        LearnConfig(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(learn=LearnConfig(steps=0)),
        dict(learn=LearnConfig(steps=4, batch_size=2)),
        dict(scope="block", learn=LearnConfig(steps=0)),
        dict(dense_target=False, learn=LearnConfig(steps=0)),
        dict(reconstruct=3, learn=LearnConfig(steps=0)),
    ],
    ids=["allocation", "learned", "block", "no-dense-target", "reconstruct"],
)
def test_prune_options_end_to_end(kw):
    m, w = _mamba1(), _windows()
    rep = prune_model(m, w, PruneConfig(method="c4", pattern="c4", sparsity=0.5, **kw), **QUIET)
    assert abs(rep["total"]["sparsity"] - 0.5) <= 32 / rep["total"]["weights"] * 2
    for block in m.backbone.layers:
        W = block.mixer.out_proj.weight
        assert torch.equal(removed_per_row(W) * W.shape[1] // 4, (W == 0).sum(1))  # one n per row
    if kw.get("reconstruct"):
        assert all(v["mse_after"] <= v["mse_before"] for v in rep["reconstruction"].values())
    if kw["learn"].steps:
        assert 0 <= rep["learning"]["rows_moved_by_fixup"] <= 1


def test_reconstruction_and_dense_target_on_a_llama_style_model():
    m = _llama(2)
    rep = prune_model(m, _windows(), PruneConfig(method="sparsegpt", pattern="2:4", reconstruct=3), **QUIET)
    assert abs(rep["total"]["sparsity"] - 0.5) < 1e-9
    assert set(rep["reconstruction"]) == {"inner.model.layers.0", "inner.model.layers.1"}
    assert all(v["mse_after"] <= v["mse_before"] for v in rep["reconstruction"].values())


def test_dense_walk_of_an_unpruned_model_gives_g_equal_to_h():
    from sparsamba.prune.calibrate import BlockWalker, prunable_layers

    for m in (_mamba1(), _llama(2)):
        block = prunable_layers(m)[1]
        st = BlockWalker(m, _windows(), batch_size=3, dense=True).stats(1, block)
        for name, _ in block:
            assert torch.allclose(st[name].G, st[name].H), name
