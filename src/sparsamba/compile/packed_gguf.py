"""Write and read the packed model file, ``sparsamba.mamba`` / ``sparsamba.mamba2`` GGUF v3
(docs/packed-format.md).

The writer takes a packed plan and stores exactly its tensors; the reader gives back a plan (no π:
the stored order is the only one the file knows) that ``plan_forward`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import SparsambaError
from ..gguf_io import GGUFTokenizer, open_gguf, write_gguf_atomically
from ..model.names import LINEARS
from .packed_v2 import unpack_matrix
from .plan import BlockPlan, Dims, LinearPlan, Plan, RowClass
from .plan_mamba2 import Dims2, is_mamba2

ARCH = "sparsamba.mamba"
ARCH2 = "sparsamba.mamba2"
FORMAT_VERSION = 2
ALIGNMENT = 64


def _np(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy()


def tensors_of(plan: Plan) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) of every tensor the file holds, in file order."""
    out: list[tuple[str, np.ndarray]] = []

    def matrix(name: str, lp: LinearPlan) -> None:
        out.append((f"{name}.v2", lp.blob.view(np.int8)))  # a 1-D I8 tensor read as bytes

    matrix("token_embd", plan.token_embd)
    if is_mamba2(plan):
        for i, b in enumerate(plan.blocks):
            p, t = f"blk.{i}.", b.tensors
            if "attn_norm.weight" in t:
                out.append((p + "attn_norm.weight", _np(t["attn_norm.weight"])))
            matrix(p + "ssm_in", b.linears["ssm_in"])
            for k in (
                "ssm_in.bias",
                "ssm_conv1d.weight",
                "ssm_conv1d.bias",
                "ssm_dt.bias",
                "ssm_a",
                "ssm_d",
                "ssm_norm.weight",
            ):
                if k in t:
                    out.append((p + k, _np(t[k])))
            matrix(p + "ssm_out", b.linears["ssm_out"])
            if "ssm_out.bias" in t:
                out.append((p + "ssm_out.bias", _np(t["ssm_out.bias"])))
    for i, b in enumerate([] if is_mamba2(plan) else plan.blocks):
        p = f"blk.{i}."
        t = b.tensors
        if "attn_norm.weight" in t:
            out.append((p + "attn_norm.weight", _np(t["attn_norm.weight"])))
        matrix(p + "ssm_in", b.linears["ssm_in"])
        if "ssm_in.bias" in t:
            out.append((p + "ssm_in.bias", _np(t["ssm_in.bias"])))
        out.append((p + "ssm_conv1d.weight", _np(t["ssm_conv1d.weight"])))
        out.append((p + "ssm_conv1d.bias", _np(t["ssm_conv1d.bias"])))
        matrix(p + "ssm_x", b.linears["ssm_x"])
        matrix(p + "ssm_dt", b.linears["ssm_dt"])
        out.append((p + "ssm_dt.bias", _np(t["ssm_dt.bias"])))
        out.append((p + "ssm_a", _np(t["ssm_a"])))
        out.append((p + "ssm_d", _np(t["ssm_d"])))
        matrix(p + "ssm_out", b.linears["ssm_out"])
        if "ssm_out.bias" in t:
            out.append((p + "ssm_out.bias", _np(t["ssm_out.bias"])))
    out.append(("output_norm.weight", _np(plan.output_norm)))
    if plan.output is not None:
        matrix("output", plan.output)
    return out


def write_packed(plan: Plan, out_path: str | Path, overwrite: bool = False) -> Path:
    """Write a packed plan (after ``pack``) as ``out_path``, atomically (temporary file + rename)."""
    import gguf

    from ..outputs import check_output

    out = Path(out_path)
    check_output(out, overwrite, file=True)
    if plan.dtype is None:
        raise SparsambaError("write_packed needs a packed plan: run the pack pass first")
    dm = plan.dims
    arch = ARCH2 if is_mamba2(plan) else ARCH
    k_ = arch + "."
    w = gguf.GGUFWriter(None, arch)  # writes general.architecture
    w.add_custom_alignment(ALIGNMENT)  # general.alignment, and the writer pads every tensor to it
    w.add_name(plan.name)
    w.add_uint32("sparsamba.format_version", FORMAT_VERSION)
    w.add_string("sparsamba.compile.dtype", plan.dtype)
    w.add_string("sparsamba.compile.options", json.dumps({"passes": plan.passes, **plan.options}))
    shape = (
        (("ssm.head_count", dm.n_heads), ("ssm.group_count", dm.n_groups))
        if is_mamba2(plan)
        else (("ssm.time_step_rank", dm.dt_rank),)
    )
    for key, val in (
        ("vocab_size", dm.vocab_size),
        ("embedding_length", dm.d_model),
        ("block_count", dm.n_layer),
        ("ssm.inner_size", dm.d_inner),
        ("ssm.state_size", dm.d_state),
        *shape,
        ("ssm.conv_kernel", dm.d_conv),
    ):
        w.add_uint32(k_ + key, val)
    w.add_float32(k_ + "attention.layer_norm_rms_epsilon", dm.eps)
    if is_mamba2(plan):
        w.add_float32(k_ + "ssm.dt_min", dm.dt_limit[0])
        w.add_float32(k_ + "ssm.dt_max", dm.dt_limit[1])  # +inf: no upper clamp
    w.add_bool(k_ + "norm_folded", plan.norm_folded)
    if plan.tokenizer is not None:
        plan.tokenizer.write(w)
    for name, arr in tensors_of(plan):
        w.add_tensor(name, arr)
    return write_gguf_atomically(w, out)


# ----------------------------------------------------------------------------------------------
# Reading


def read_packed(path: str | Path) -> Plan:
    """A file written by ``write_packed`` -> its plan (packed, perm None), tensors as stored."""
    path = Path(path)
    r, kv, t = open_gguf(path, "packed model")

    arch = kv("general.architecture")
    if arch not in (ARCH, ARCH2):
        raise SparsambaError(f"{path}: architecture {arch!r}, not {ARCH!r} or {ARCH2!r}")
    if kv("sparsamba.format_version") != FORMAT_VERSION:
        raise SparsambaError(
            f"{path}: packed format version {kv('sparsamba.format_version')}; this reader knows format version "
            f"{FORMAT_VERSION}: recompile it with sparsamba compile"
        )
    # stored as float32: 1e-5 comes back as 9.99999975e-06; 7 digits give the decimal it was written from
    K_ = arch + "."
    eps = float(f"{kv(K_ + 'attention.layer_norm_rms_epsilon'):.7g}")
    # the keys both architectures store; each adds its own below
    common = dict(
        vocab_size=kv(K_ + "vocab_size"),
        d_model=kv(K_ + "embedding_length"),
        n_layer=kv(K_ + "block_count"),
        d_inner=kv(K_ + "ssm.inner_size"),
        d_state=kv(K_ + "ssm.state_size"),
        d_conv=kv(K_ + "ssm.conv_kernel"),
        eps=eps,
        tied="output.v2" not in t,
        use_bias="blk.0.ssm_in.bias" in t,
    )
    if arch == ARCH2:
        dims = Dims2(
            **common,
            n_heads=kv(K_ + "ssm.head_count"),
            n_groups=kv(K_ + "ssm.group_count"),
            dt_limit=(float(f"{kv(K_ + 'ssm.dt_min'):.7g}"), float(f"{kv(K_ + 'ssm.dt_max'):.7g}")),
        )
    else:
        dims = Dims(**common, dt_rank=kv(K_ + "ssm.time_step_rank"))

    def take(name: str) -> torch.Tensor:
        if name not in t:
            raise SparsambaError(f"{path}: tensor {name} is missing; not a complete packed model")
        return t.pop(name)

    def matrix(name: str, out: int, n_in: int) -> LinearPlan:
        """the blob, and its classes' rows and keep masks (one n = 0 class of every row in order: dense)"""
        blob = take(f"{name}.v2").numpy().view(np.uint8)
        try:
            m = unpack_matrix(blob)
        except ValueError as e:
            raise SparsambaError(f"{path}: tensor {name}.v2: {e}") from None
        if (m.out, m.in_) != (out, n_in):
            raise SparsambaError(f"{path}: tensor {name}.v2 is ({m.out}, {m.in_}), expected ({out}, {n_in})")
        if len(m.classes) == 1 and m.classes[0].n == 0 and np.array_equal(m.classes[0].rows, np.arange(out)):
            return LinearPlan(out, n_in, blob=blob)
        classes = [RowClass(c.n, torch.from_numpy(c.rows), torch.from_numpy(c.keep)) for c in m.classes]
        return LinearPlan(out, n_in, classes=classes, blob=blob)

    emb = matrix("token_embd", dims.vocab_size, dims.d_model)
    blocks = []
    for i in range(dims.n_layer):
        p = f"blk.{i}."
        tensors = {}
        for k in ("attn_norm.weight", "ssm_in.bias", "ssm_out.bias", "ssm_norm.weight"):
            if p + k in t:
                tensors[k] = take(p + k)
        for k in ("ssm_conv1d.weight", "ssm_conv1d.bias", "ssm_a", "ssm_d", "ssm_dt.bias"):
            tensors[k] = take(p + k)
        lin = {
            k: matrix(p + k, *dims.linear_shape(k)) for k in LINEARS[dims.arch if arch == ARCH2 else "mamba"]
        }
        blocks.append(BlockPlan(tensors, lin))
    output_norm = take("output_norm.weight")
    head = None if dims.tied else matrix("output", dims.vocab_size, dims.d_model)
    if t:
        raise SparsambaError(f"{path}: unexpected tensors {sorted(t)[:3]}")

    opts = json.loads(kv("sparsamba.compile.options"))
    passes = opts.pop("passes", [])
    return Plan(
        dims=dims,
        name=kv("general.name"),
        token_embd=emb,
        output=head,
        output_norm=output_norm,
        blocks=blocks,
        tokenizer=GGUFTokenizer.from_gguf(kv),
        norm_folded=bool(kv(K_ + "norm_folded")),
        dtype=kv("sparsamba.compile.dtype"),
        passes=passes,
        options=opts,
    )
