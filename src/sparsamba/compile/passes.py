"""The compiler's passes, each a function Plan -> Plan, run in this order (docs/DESIGN.md §6):

    reorder        group each layer's rows by n; rows of n = 4 vanish
    fold_layouts   one channel order π per block, applied to every d_inner tensor at compile time
    fuse           fold RMSNorm's weight into ssm_in; record the fusions the engine's loops do
    pack(dtype)    one matrix blob per layer (packed format v2, rows in lanes), as docs/packed-format.md stores it

Each returns a new plan computing the same function (``verify`` checks it between passes).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .. import formats
from ..errors import SparsambaError
from .plan import BlockPlan, LinearPlan, Plan, RowClass, classify_rows, dense_rows, with_pass
from .plan_mamba2 import fold_mamba2, fuse_mamba2, is_mamba2

PASSES = ("reorder", "fold", "fuse", "pack")


# ----------------------------------------------------------------------------------------------
# reorder


def classes_of(W: Tensor) -> list[RowClass] | None:
    """W (out, in) fp32 -> its row classes, n ascending, rows ascending; None when the layer stays dense.

    Dense: no row removes a real weight (every n is what the padding alone gives, 0 when in >= 4). A
    layer whose every row is zero has no class (``[]``): its blob is the header alone, and the engine
    reads nothing for it (it was stored dense once, a whole dense read for a layer pruned away).
    """
    n, keep = classify_rows(W)
    n_pad = max(0, 4 - W.shape[1])  # a dense row of in < 4 reads as n = 4 - in
    if bool((n == n_pad).all()):
        return None
    classes = []
    for c in range(4):
        rows = (n == c).nonzero().flatten()
        if len(rows):
            w = W[rows] * keep[rows, : W.shape[1]]  # zero already off `keep`; masking keeps it exact
            classes.append(RowClass(c, rows.to(torch.int32), keep[rows], weight=w))
    return classes


def reorder(plan: Plan) -> Plan:
    """Group each prunable layer's rows by n (one loop per class, no per-row branch in the engine)."""
    p = plan.copy()
    hist = {}
    for i, b in enumerate(p.blocks):
        for k, lp in b.linears.items():
            if lp.dense:
                cl = classes_of(lp.weight)
                if cl is not None:
                    b.linears[k] = replace(lp, weight=None, classes=cl)
            h = [0] * 5
            for c in b.linears[k].classes or []:
                h[c.n] = len(c.rows)
            if b.linears[k].dense:
                h = "dense"
            else:
                h[4] = lp.out_features - sum(h)
            hist[f"blk.{i}.{k}"] = h
    return with_pass(p, "reorder", rows_by_n=hist)


# ----------------------------------------------------------------------------------------------
# fold_layouts


def _class_order(lp: LinearPlan, di: int) -> Tensor | None:
    """π from ssm_in: the x-half rows (output < di) class by class, n ascending, index ascending, then
    the removed ones (n = 4) ascending. None when ssm_in is dense (the identity)."""
    if lp.dense:
        return None
    seen = [c.rows.long()[c.rows < di] for c in lp.classes]
    order = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.long)
    rest = torch.ones(di, dtype=torch.bool)
    rest[order] = False
    return torch.cat([order, rest.nonzero().flatten()])


def _permute_rows(lp: LinearPlan, new_index: Tensor, src: Tensor) -> LinearPlan:
    """Rows renamed: output r becomes new_index[r]; ``src`` (out,) = the old row of each new one (dense)."""
    if lp.dense:
        return replace(lp, weight=lp.weight[src])
    classes = []
    for c in lp.classes:
        rows = new_index[c.rows.long()]
        o = rows.argsort()  # keep every class's rows ascending
        classes.append(
            replace(c, rows=rows[o].to(torch.int32), keep=c.keep[o], weight=None if c.weight is None else c.weight[o])
        )
    return replace(lp, classes=classes)


def _permute_cols(lp: LinearPlan, perm: Tensor) -> LinearPlan:
    if lp.dense:
        return replace(lp, weight=lp.weight[:, perm])
    return replace(lp, classes=classes_of(dense_rows(lp)[:, perm]))


def _keeps_groups(lp: LinearPlan, perm: Tensor) -> bool:
    """Whether permuting the columns leaves every row's n as it is (else packing would store zeros)."""
    if lp.dense:
        return True
    before = classify_rows(dense_rows(lp))[0]
    return bool((classify_rows(dense_rows(lp)[:, perm])[0] == before).all())


def fold_layouts(plan: Plan) -> Plan:
    """Choose π_i per block and store every d_inner tensor of the block in that order.

    π_i = the order of ssm_in's x rows after reorder, so each class of ssm_in writes its x outputs to
    one contiguous range. Columns of ssm_x and ssm_out are permuted too, which moves weights between
    groups of 4: π_i is used only when that keeps the n of every row of both layers (true when ssm_in's
    rows were pruned in aligned blocks of 4 sharing n, ``prune --row-block 4``); otherwise the block
    keeps the identity and ssm_in writes through its row index, which costs no activation movement.
    """
    if plan.dtype is not None:
        raise SparsambaError("fold_layouts runs before pack: the packed codes would have to be rebuilt")
    p = plan.copy()
    di = p.dims.d_inner
    choice = {}
    for i, b in enumerate(p.blocks):
        perm = _class_order(b.linears["ssm_in"], di)
        name = f"blk.{i}"
        if perm is None or bool((perm == torch.arange(di)).all()):
            choice[name] = "identity (ssm_in's x rows already in class order)"
            continue
        if not (_keeps_groups(b.linears["ssm_x"], perm) and _keeps_groups(b.linears["ssm_out"], perm)):
            choice[name] = "identity (the class order would break the groups of 4 of ssm_x / ssm_out)"
            continue
        p.blocks[i] = permute_block(b, perm, di)
        choice[name] = "class order of ssm_in's x rows"
    return with_pass(p, "fold", pi=choice)


def permute_block(b: BlockPlan, perm: Tensor, di: int) -> BlockPlan:
    """The block with every d_inner tensor in channel order ``perm`` (stored c = source perm[c])."""
    inv = perm.argsort()  # source channel -> stored position
    t = dict(b.tensors)
    for k in ("ssm_conv1d.weight", "ssm_conv1d.bias", "ssm_a", "ssm_d", "ssm_dt.bias"):
        t[k] = t[k][perm]
    both = torch.cat([perm, perm + di])  # x and z halves of ssm_in, each in π order
    if "ssm_in.bias" in t:
        t["ssm_in.bias"] = t["ssm_in.bias"][both]
    lin = dict(b.linears)
    lin["ssm_in"] = _permute_rows(lin["ssm_in"], torch.cat([inv, inv + di]), both)
    lin["ssm_dt"] = _permute_rows(lin["ssm_dt"], inv, perm)
    lin["ssm_x"] = _permute_cols(lin["ssm_x"], perm)
    lin["ssm_out"] = _permute_cols(lin["ssm_out"], perm)
    total = perm if b.perm is None else b.perm[perm]
    return BlockPlan(t, lin, total)


# ----------------------------------------------------------------------------------------------
# fuse


def fuse(plan: Plan) -> Plan:
    """ssm_in(w ⊙ û) = (ssm_in · diag(w)) û: the RMSNorm weight becomes ssm_in's column scale. Exact
    zeros stay zeros, so the classes hold. The other fusions are loops of the engine, recorded here."""
    if plan.dtype is not None:
        raise SparsambaError("fuse runs before pack: it changes ssm_in's values")
    if plan.norm_folded:
        return with_pass(plan, "fuse", note="norm already folded")
    p = plan.copy()
    for b in p.blocks:
        w = b.tensors.pop("attn_norm.weight")  # (d,)
        lp = b.linears["ssm_in"]
        if lp.dense:
            b.linears["ssm_in"] = replace(lp, weight=lp.weight * w)
        else:
            b.linears["ssm_in"] = replace(lp, classes=[replace(c, weight=c.weight * w) for c in lp.classes])
    p.norm_folded = True
    return with_pass(
        p,
        "fuse",
        folded=["attn_norm.weight -> ssm_in columns"],
        engine_loops=["conv1d + silu", "ssm_dt + softplus", "scan + D skip + silu(z) gate", "ssm_out + residual"],
    )


# ----------------------------------------------------------------------------------------------
# pack


def _pack_linear(lp: LinearPlan, dtype: str, what: str) -> LinearPlan:
    """The layer's blob (packed_v2.pack_plan_linear); the classes keep their rows and keep masks (the
    summary's structure), the weights live in the blob only."""
    from .packed_v2 import pack_plan_linear

    try:
        blob = pack_plan_linear(lp, dtype, what)
    except ValueError as e:
        raise SparsambaError(str(e)) from None
    classes = None if lp.dense else [replace(c, weight=None) for c in lp.classes]
    return replace(lp, weight=None, classes=classes, blob=blob)


def pack(plan: Plan, dtype: str = "f16") -> Plan:
    """Store every matrix as a packed-format-v2 blob in ``dtype`` (f32, f16, int8 with per-row scales):
    a dense layer is one n = 0 class of every row; token_embd and output take the dtype too."""
    formats.get(dtype)
    if plan.dtype is not None:
        raise SparsambaError(f"the plan is already packed ({plan.dtype})")
    p = plan.copy()
    p.token_embd = _pack_linear(p.token_embd, dtype, "token_embd.weight")
    if p.output is not None:
        p.output = _pack_linear(p.output, dtype, "output.weight")
    for i, b in enumerate(p.blocks):
        for k, lp in b.linears.items():
            b.linears[k] = _pack_linear(lp, dtype, f"blk.{i}.{k}")
    p.dtype = dtype
    fmt = {
        f"blk.{i}.{k}": "dense" if lp.dense else "+".join(f"c4n{c.n}_{dtype}" for c in lp.classes) or "removed"
        for i, b in enumerate(p.blocks)
        for k, lp in b.linears.items()
    }
    scale = "per-row max|kept w| / 127, 1 for a zero row" if dtype == "int8" else None
    return with_pass(
        p, "pack", dtype=dtype, formats=fmt, int8_scale=scale, layout="v2: blocks of 16 rows per n-class, 2-bit codes"
    )


def run_pass(plan: Plan, name: str, dtype: str = "f16") -> Plan:
    if name == "reorder":
        return reorder(plan)
    if name in ("fold", "fuse") and is_mamba2(plan):
        return fold_mamba2(plan) if name == "fold" else fuse_mamba2(plan)
    if name == "fold":
        return fold_layouts(plan)
    if name == "fuse":
        return fuse(plan)
    if name == "pack":
        return pack(plan, dtype)
    raise SparsambaError(f"unknown pass {name!r}; the passes are {', '.join(PASSES)}")
