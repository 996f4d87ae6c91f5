"""Mamba-2 in the compiler: its dims, its plan from a loaded ``Mamba2LM``, its passes (fold, fuse) and
``plan_forward_mamba2``, the Python reference of what the engine computes for a ``sparsamba.mamba2``
file (docs/packed-format.md, "Mamba-2"). reorder and pack are the Mamba-1 passes unchanged: they only
see the block's matrices, ``ssm_in`` and ``ssm_out``.

Letters as in model/mamba2.py: h heads of p channels (di = h·p), g groups of B/C, N d_state, K conv
width, cd = di + 2gN the channels through conv1d. ``ssm_in``'s rows are [z (di) | x (di) | B (gN) |
C (gN) | Δ (h)], transformers' order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SparsambaError
from .plan import BlockPlan, LinearPlan, Plan, with_pass

ARCH2 = "mamba2"


@dataclass(frozen=True)
class Dims2:
    vocab_size: int  # V
    d_model: int  # d
    n_layer: int  # L
    d_inner: int  # di = h · p
    d_state: int  # N
    d_conv: int  # K
    n_heads: int  # h
    n_groups: int  # g
    eps: float  # the block RMSNorms' and the gated norm's epsilon
    tied: bool
    use_bias: bool  # ssm_in / ssm_out have biases
    dt_limit: tuple[float, float]  # Δ is clamped into [lo, hi]
    arch = ARCH2

    @property
    def head_dim(self) -> int:  # p
        return self.d_inner // self.n_heads

    @property
    def conv_dim(self) -> int:  # cd
        return self.d_inner + 2 * self.n_groups * self.d_state

    def linear_shape(self, name: str) -> tuple[int, int]:
        di, d = self.d_inner, self.d_model
        return {"ssm_in": (di + self.conv_dim + self.n_heads, d), "ssm_out": (d, di)}[name]


def is_mamba2(plan: Plan) -> bool:
    return getattr(plan.dims, "arch", "mamba") == ARCH2


def check_supported(cfg, where: str) -> None:
    """Refuse, in one line naming the field, a Mamba-2 config the engine does not run. (norm_before_gate,
    hidden_act and a head_dim that does not divide d_inner are refused when config.json is read.)"""
    if not cfg.rms_norm:
        raise SparsambaError(
            f"{where}: rms_norm = false (no gated RMSNorm before out_proj) is not supported by the packed "
            "engine; compile a model with rms_norm = true"
        )
    if cfg.hidden_act != "silu":
        raise SparsambaError(
            f"{where}: hidden_act {cfg.hidden_act!r} is not supported by the packed engine, only 'silu'"
        )
    if cfg.intermediate_size % cfg.head_dim or cfg.num_heads * cfg.head_dim != cfg.intermediate_size:
        raise SparsambaError(
            f"{where}: head_dim {cfg.head_dim} does not divide intermediate_size {cfg.intermediate_size} into num_heads {cfg.num_heads}"
        )
    lo, hi = cfg.time_step_limit
    if not (math.isfinite(lo) and lo >= 0 and hi >= lo):
        raise SparsambaError(
            f"{where}: time_step_limit {list(cfg.time_step_limit)} must be [lo, hi] with 0 <= lo <= hi"
        )


def plan_from_mamba2(model, name: str, tokenizer=None) -> Plan:
    """The plan of a loaded ``Mamba2LM``: fp32 tensors, every layer dense."""
    cfg = model.config
    check_supported(cfg, name)
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise SparsambaError(f"{name}: tensor {k} holds inf or NaN; the model cannot be compiled")
    dims = Dims2(
        vocab_size=cfg.vocab_size,
        d_model=cfg.hidden_size,
        n_layer=cfg.num_hidden_layers,
        d_inner=cfg.intermediate_size,
        d_state=cfg.state_size,
        d_conv=cfg.conv_kernel,
        n_heads=cfg.num_heads,
        n_groups=cfg.n_groups,
        eps=float(cfg.layer_norm_epsilon),
        tied=bool(cfg.tie_word_embeddings),
        use_bias=bool(cfg.use_bias),
        dt_limit=(float(cfg.time_step_limit[0]), float(cfg.time_step_limit[1])),
    )
    cd = dims.conv_dim
    blocks = []
    for i in range(dims.n_layer):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        t = {
            "attn_norm.weight": sd[p + "norm.weight"],  # (d,)
            "ssm_conv1d.weight": sd[m + "conv1d.weight"][:, 0, :].contiguous(),  # (cd, K)
            "ssm_conv1d.bias": sd.get(m + "conv1d.bias", torch.zeros(cd)),  # (cd,)
            "ssm_dt.bias": sd[m + "dt_bias"],  # (h,)
            "ssm_a": -torch.exp(sd[m + "A_log"]),  # (h,)
            "ssm_d": sd[m + "D"],  # (h,)
            "ssm_norm.weight": sd[m + "norm.weight"],  # (di,)
        }
        if dims.use_bias:
            t["ssm_in.bias"] = sd[m + "in_proj.bias"]
            t["ssm_out.bias"] = sd[m + "out_proj.bias"]
        lin = {
            k: LinearPlan(*sd[m + f"{hf}.weight"].shape, weight=sd[m + f"{hf}.weight"])
            for k, hf in (("ssm_in", "in_proj"), ("ssm_out", "out_proj"))
        }
        blocks.append(BlockPlan(t, lin))
    embd, head = sd["backbone.embeddings.weight"], sd.get("lm_head.weight")
    return Plan(
        dims=dims,
        name=name,
        token_embd=LinearPlan(*embd.shape, weight=embd),
        output=None if dims.tied else LinearPlan(*head.shape, weight=head),
        output_norm=sd["backbone.norm_f.weight"],
        blocks=blocks,
        tokenizer=tokenizer,
    )


# ----------------------------------------------------------------------------------------------
# Passes


def fold_mamba2(plan: Plan) -> Plan:
    """Mamba-2 keeps the identity order. A channel permutation would have to stay inside one head (Δ,
    A and D are per head) and one norm group, move z's and x's rows of ssm_in together, and permute
    ssm_out's columns, whose groups of 4 it breaks unless rows were pruned in aligned blocks; and
    ssm_in's classes already write through their row index, which moves no activation at run time."""
    if plan.dtype is not None:
        raise SparsambaError("fold_layouts runs before pack: the packed codes would have to be rebuilt")
    choice = {
        f"blk.{i}": "identity (Mamba-2: ssm_in writes through its row index)" for i in range(len(plan.blocks))
    }
    return with_pass(plan.copy(), "fold", pi=choice)


def _scale_cols(lp: LinearPlan, w: Tensor) -> LinearPlan:
    if lp.dense:
        return replace(lp, weight=lp.weight * w)
    return replace(lp, classes=[replace(c, weight=c.weight * w) for c in lp.classes])


def fuse_mamba2(plan: Plan) -> Plan:
    """Both norm weights become column scales of the next matrix: ssm_in(w ⊙ û) = (ssm_in·diag w) û for
    the block RMSNorm, ssm_out(w ⊙ n_g(y ⊙ silu z)) = (ssm_out·diag w) n_g(…) for the gated norm. Exact
    zeros stay zeros, so the classes hold. The other fusions are loops of the engine, recorded here."""
    if plan.dtype is not None:
        raise SparsambaError("fuse runs before pack: it changes ssm_in's and ssm_out's values")
    if plan.norm_folded:
        return with_pass(plan, "fuse", note="norms already folded")
    p = plan.copy()
    for b in p.blocks:
        b.linears["ssm_in"] = _scale_cols(b.linears["ssm_in"], b.tensors.pop("attn_norm.weight"))
        b.linears["ssm_out"] = _scale_cols(b.linears["ssm_out"], b.tensors.pop("ssm_norm.weight"))
    p.norm_folded = True
    return with_pass(
        p,
        "fuse",
        folded=["attn_norm.weight -> ssm_in columns", "ssm_norm.weight -> ssm_out columns"],
        engine_loops=[
            "conv1d over x, B, C + silu",
            "dt bias + softplus + time_step_limit clamp",
            "scan + D skip",
            "silu(z) gate + group RMSNorm",
            "ssm_out + residual",
        ],
    )


# ----------------------------------------------------------------------------------------------
# The reference forward of the packed plan


def _rmsnorm(h: Tensor, eps: float) -> Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def plan_forward_mamba2(plan: Plan, ids: Tensor, u) -> Tensor:
    """Logits (b, l, V) of ids (b, l), token by token, as the engine computes them (``u``: verify's
    _Unpacked, the packed products)."""
    dm: Dims2 = plan.dims
    b, L = ids.shape
    di, N, K, h, g, p = dm.d_inner, dm.d_state, dm.d_conv, dm.n_heads, dm.n_groups, dm.head_dim
    cd, r = dm.conv_dim, h // g
    lo, hi = dm.dt_limit
    head = plan.output or plan.token_embd
    conv = [torch.zeros(b, cd, K - 1) for _ in plan.blocks]  # the last K-1 inputs of conv1d
    ssm = [torch.zeros(b, h, p, N) for _ in plan.blocks]  # S
    out = []
    for t in range(L):
        hs = u.rows(plan.token_embd, ids[:, t])  # (b, d)
        for i, blk in enumerate(plan.blocks):
            T, lin = blk.tensors, blk.linears
            un = _rmsnorm(hs, dm.eps)
            if not plan.norm_folded:
                un = un * T["attn_norm.weight"]
            zxd = u.linear(lin["ssm_in"], un)
            if "ssm_in.bias" in T:
                zxd = zxd + T["ssm_in.bias"]
            z, xbc, dtr = zxd[:, :di], zxd[:, di : di + cd], zxd[:, di + cd :]
            window = torch.cat([conv[i], xbc[:, :, None]], 2)  # (b, cd, K), oldest first
            conv[i] = window[:, :, 1:]
            xbc = F.silu((window * T["ssm_conv1d.weight"]).sum(-1) + T["ssm_conv1d.bias"])
            x = xbc[:, :di].view(b, h, p)
            B = xbc[:, di : di + g * N].view(b, g, N).repeat_interleave(r, 1)  # (b, h, N)
            C = xbc[:, di + g * N :].view(b, g, N).repeat_interleave(r, 1)
            dt = F.softplus(dtr + T["ssm_dt.bias"]).clamp(lo, hi)  # (b, h); softplus(v) = v for v > 20
            ssm[i] = (
                torch.exp(dt * T["ssm_a"])[:, :, None, None] * ssm[i]
                + (dt[:, :, None] * x)[..., None] * B[:, :, None, :]
            )
            y = (ssm[i] * C[:, :, None, :]).sum(-1) + T["ssm_d"][:, None] * x  # (b, h, p)
            y = (y.reshape(b, di) * F.silu(z)).view(b, g, di // g)
            y = _rmsnorm(y, dm.eps).reshape(b, di)
            if not plan.norm_folded:
                y = y * T["ssm_norm.weight"]
            hs = hs + u.linear(lin["ssm_out"], y)
            if "ssm_out.bias" in T:
                hs = hs + T["ssm_out.bias"]
        out.append(u.linear(head, _rmsnorm(hs, dm.eps) * plan.output_norm))
    return torch.stack(out, 1)  # (b, l, V)


def check_tensors(plan: Plan, fail) -> None:
    """Shapes of a Mamba-2 block's per-channel tensors; ``fail(what)`` raises."""
    dm: Dims2 = plan.dims
    want = {
        "ssm_conv1d.weight": (dm.conv_dim, dm.d_conv),
        "ssm_conv1d.bias": (dm.conv_dim,),
        "ssm_dt.bias": (dm.n_heads,),
        "ssm_a": (dm.n_heads,),
        "ssm_d": (dm.n_heads,),
    }
    if not plan.norm_folded:
        want["attn_norm.weight"] = (dm.d_model,)
        want["ssm_norm.weight"] = (dm.d_inner,)
    if dm.use_bias:
        want["ssm_in.bias"] = (dm.linear_shape("ssm_in")[0],)
        want["ssm_out.bias"] = (dm.d_model,)
    for i, b in enumerate(plan.blocks):
        if set(b.tensors) != set(want):
            fail(f"blk.{i} holds {sorted(b.tensors)}, expected {sorted(want)}")
        for k, shape in want.items():
            if tuple(b.tensors[k].shape) != shape:
                fail(f"blk.{i}.{k} has shape {tuple(b.tensors[k].shape)}, expected {shape}")
