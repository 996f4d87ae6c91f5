"""The verifier run between passes, and ``plan_forward``: the Python reference of the packed format.

``plan_forward`` follows "What the engine computes" in docs/packed-format.md line by line, one token at
a time, reading packed layers the way the engine does (each blob unpacked, int8 products on activations
rounded per chunk as the kernels round them: ``packed_v2.matvec``), so a
plan read back from a file (``read_packed``) is the golden model the C engine is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import formats
from ..errors import SparsambaError
from .packed_v2 import dense_of, matvec, unpack_matrix
from .plan import LinearPlan, Plan
from .plan_mamba2 import check_tensors, is_mamba2, plan_forward_mamba2

# ----------------------------------------------------------------------------------------------
# The forward


def linear(lp: LinearPlan, x: Tensor) -> Tensor:
    """y = W x for x (b, in) -> (b, out), fp32, for a layer not yet packed (dense, or its classes)."""
    if lp.dense:
        return x @ lp.weight.float().T
    y = x.new_zeros(x.shape[0], lp.out_features)
    for c in lp.classes:
        y[:, c.rows.long()] = x @ c.weight.T
    return y


class _Unpacked:
    """Each blob of a plan unpacked once per forward: (MatrixV2, its dense fp32 weights)."""

    def __init__(self):
        self.cache: dict[int, tuple] = {}

    def matrix(self, lp: LinearPlan) -> tuple:
        if id(lp) not in self.cache:
            m = unpack_matrix(lp.blob)
            self.cache[id(lp)] = (m, dense_of(m))
        return self.cache[id(lp)]

    def linear(self, lp: LinearPlan, x: Tensor) -> Tensor:
        """as the engine computes it: int8 layers round the activations per chunk (packed_v2.matvec)"""
        if not lp.packed:
            return linear(lp, x)
        m, W = self.matrix(lp)
        return torch.from_numpy(matvec(m, W, x.numpy()))

    def rows(self, lp: LinearPlan, ids: Tensor) -> Tensor:
        """the embedding lookup: rows ids of the matrix, fp32"""
        if not lp.packed:
            return lp.weight[ids].float()
        return torch.from_numpy(self.matrix(lp)[1][ids.numpy()])


def _rmsnorm(h: Tensor, eps: float) -> Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def plan_forward(plan: Plan, ids: Tensor) -> Tensor:
    """Logits (b, l, V) of token ids (b, l) (or (l,) -> (l, V)), computed from the plan token by token."""
    squeeze = ids.ndim == 1
    ids = ids.view(1, -1) if squeeze else ids
    if is_mamba2(plan):
        logits = plan_forward_mamba2(plan, ids, _Unpacked())
        return logits[0] if squeeze else logits
    dm = plan.dims
    b, L = ids.shape
    di, N, R, K = dm.d_inner, dm.d_state, dm.dt_rank, dm.d_conv
    embd = plan.token_embd
    head = plan.output or embd
    u = _Unpacked()  # the packed layers' products, as the engine computes them
    conv = [torch.zeros(b, di, K - 1) for _ in plan.blocks]  # the last K-1 inputs of conv1d
    ssm = [torch.zeros(b, di, N) for _ in plan.blocks]  # s
    out = []
    for t in range(L):
        h = u.rows(embd, ids[:, t])  # (b, d)
        for i, blk in enumerate(plan.blocks):
            T, lin = blk.tensors, blk.linears
            un = _rmsnorm(h, dm.eps)
            if not plan.norm_folded:
                un = un * T["attn_norm.weight"]
            xz = u.linear(lin["ssm_in"], un)
            if "ssm_in.bias" in T:
                xz = xz + T["ssm_in.bias"]
            x, z = xz[:, :di], xz[:, di:]
            window = torch.cat([conv[i], x[:, :, None]], 2)  # (b, di, K), oldest first
            conv[i] = window[:, :, 1:]
            xc = F.silu((window * T["ssm_conv1d.weight"]).sum(-1) + T["ssm_conv1d.bias"])
            dbc = u.linear(lin["ssm_x"], xc)
            dr, B, C = dbc[:, :R], dbc[:, R : R + N], dbc[:, R + N :]
            delta = F.softplus(u.linear(lin["ssm_dt"], dr) + T["ssm_dt.bias"])  # softplus(v) = v for v > 20
            ssm[i] = torch.exp(delta[:, :, None] * T["ssm_a"]) * ssm[i] + (delta * xc)[:, :, None] * B[:, None, :]
            y = ((ssm[i] * C[:, None, :]).sum(-1) + T["ssm_d"] * xc) * F.silu(z)
            h = h + u.linear(lin["ssm_out"], y)
            if "ssm_out.bias" in T:
                h = h + T["ssm_out.bias"]
        out.append(u.linear(head, _rmsnorm(h, dm.eps) * plan.output_norm))
    logits = torch.stack(out, 1)  # (b, l, V)
    return logits[0] if squeeze else logits


# ----------------------------------------------------------------------------------------------
# Structural checks


def _fail(stage: str, what: str) -> None:
    raise SparsambaError(f"compile verifier, after {stage}: {what} (a compiler bug; please report it)")


def check_linear(name: str, lp: LinearPlan, dtype: str | None, stage: str) -> None:
    out, n_in, G = lp.out_features, lp.in_features, lp.groups
    if lp.packed:
        _check_blob(name, lp, dtype, stage)
    elif lp.dense:
        if lp.weight is None or tuple(lp.weight.shape) != (out, n_in) or lp.weight.dtype != torch.float32:
            _fail(stage, f"{name}.weight is not a ({out}, {n_in}) fp32 matrix")
        return
    seen = torch.zeros(out, dtype=torch.bool)
    for c in lp.classes or []:
        tag = f"{name}.c{c.n}"
        r = len(c.rows)
        if not 0 <= c.n <= 3 or r == 0:
            _fail(stage, f"{tag}: n must be 0..3 and the class non-empty")
        if c.rows.dtype != torch.int32 or int(c.rows.min()) < 0 or int(c.rows.max()) >= out:
            _fail(stage, f"{tag}.rows out of range [0, {out}) or not int32")
        if seen[c.rows.long()].any() or len(set(c.rows.tolist())) != r:
            _fail(stage, f"{tag}.rows repeats an output row")
        seen[c.rows.long()] = True
        if tuple(c.keep.shape) != (r, 4 * G) or not bool((c.keep.view(r, G, 4).sum(-1) == 4 - c.n).all()):
            _fail(stage, f"{tag}: the keep mask does not keep exactly {4 - c.n} of every group of 4")
        if lp.packed:
            continue
        if c.weight is None or tuple(c.weight.shape) != (r, n_in):
            _fail(stage, f"{tag}.weight is not ({r}, {n_in})")
        if bool((c.weight[~c.keep[:, :n_in]] != 0).any()):
            _fail(stage, f"{tag}.weight is non-zero off its kept positions")


def _check_blob(name: str, lp: LinearPlan, dtype: str | None, stage: str) -> None:
    """The blob unpacked (its header, counts and codes checked by the reader) against the layer: dtype,
    shape, and the classes' rows and kept positions (a dense layer: one n = 0 class of every row)."""
    try:
        m = unpack_matrix(lp.blob)
    except ValueError as e:
        _fail(stage, f"{name}.v2: {e}")
    if m.dtype != dtype or (m.out, m.in_) != (lp.out_features, lp.in_features):
        _fail(stage, f"{name}.v2 is ({m.out}, {m.in_}) {m.dtype}, the layer ({lp.out_features}, {lp.in_features}) {dtype}")
    want = (
        [(0, torch.arange(lp.out_features), None)] if lp.dense else [(c.n, c.rows.long(), c.keep) for c in lp.classes]
    )
    if [c.n for c in m.classes] != [n for n, _, _ in want]:
        _fail(stage, f"{name}.v2 holds classes n = {[c.n for c in m.classes]}, the layer {[n for n, _, _ in want]}")
    for c, (n, rows, keep) in zip(m.classes, want, strict=True):
        if not torch.equal(torch.from_numpy(c.rows).long(), rows):
            _fail(stage, f"{name}.v2 class n={n}: its rows are not the layer's")
        if keep is not None and not torch.equal(torch.from_numpy(c.keep), keep):
            _fail(stage, f"{name}.v2 class n={n}: its codes do not encode the kept positions")
        if (c.scale is not None) != formats.get(dtype).scaled:
            _fail(stage, f"{name}.v2 class n={n}: row scales present {c.scale is not None} for dtype {dtype}")


def check_plan(plan: Plan, stage: str) -> None:
    """Structure: shapes, dtypes, classes, codes, π; raises SparsambaError naming the tensor."""
    dm = plan.dims
    if len(plan.blocks) != dm.n_layer:
        _fail(stage, f"{len(plan.blocks)} blocks for block_count {dm.n_layer}")
    emb_dtype = plan.dtype
    check_linear("token_embd", plan.token_embd, emb_dtype, stage)
    if not plan.token_embd.dense or (plan.output is not None and not plan.output.dense):
        _fail(stage, "token_embd / output must stay dense")
    if (plan.output is None) != dm.tied:
        _fail(stage, "output.weight must exist exactly when the head is untied")
    if plan.output is not None:
        check_linear("output", plan.output, emb_dtype, stage)
    di = dm.d_inner
    for i, b in enumerate(plan.blocks):
        for k, lp in b.linears.items():
            if (lp.out_features, lp.in_features) != dm.linear_shape(k):
                _fail(stage, f"blk.{i}.{k} has shape {(lp.out_features, lp.in_features)}")
            check_linear(f"blk.{i}.{k}", lp, plan.dtype, stage)
        if ("attn_norm.weight" in b.tensors) == plan.norm_folded:
            _fail(stage, f"blk.{i}.attn_norm.weight present although norm_folded = {plan.norm_folded}")
        if ("ssm_in.bias" in b.tensors) != dm.use_bias:
            _fail(stage, f"blk.{i}.ssm_in.bias present although use_bias = {dm.use_bias}")
        if b.perm is not None and not torch.equal(b.perm.sort().values, torch.arange(di)):
            _fail(stage, f"blk.{i}: π is not a permutation of 0..{di - 1}")
    if is_mamba2(plan):
        check_tensors(plan, lambda what: _fail(stage, what))


# ----------------------------------------------------------------------------------------------
# Functional check


def sample_ids(vocab_size: int, batch: int = 2, length: int = 6, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def verify(plan: Plan, stage: str, ids: Tensor, ref_logits: Tensor) -> float:
    """Structural checks, then the plan's logits on ``ids`` against the source model's ``ref_logits``;
    returns max |Δ| / max |ref| and raises SparsambaError above the dtype's ``formats.Dtype.tolerance``."""
    check_plan(plan, stage)
    got = plan_forward(plan, ids)
    d = (got - ref_logits).abs()
    err = (d.max() / ref_logits.abs().max()).item()
    tol = formats.get(plan.dtype).tolerance  # before pack: fp32
    if not err <= tol:  # NaN fails too
        _fail(stage, f"logits differ from the source model's by {err:.3g} (max relative), over {tol:g}; mean |Δ| {d.mean():.3g}")
    return err
