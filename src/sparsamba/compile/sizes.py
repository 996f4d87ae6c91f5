"""Bytes of every prunable layer in three formats, for the same weights in the same dtype W:

    dense  out·in·bytes(W)
    CSR    nnz·(bytes(W) + 4) + (out + 1)·4        int32 column indices, int32 row pointers
    ours   the layer's matrix blob (packed format v2: headers, row indices, int8 scales, 2-bit codes and
           values in blocks of 16 rows, padding to 64 bytes included), as write_packed stores it

With int8 every format also needs its per-row scales, out·4 bytes, added to dense and CSR alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import formats
from .packed_v2 import DTYPES, matrix_bytes, unpack_matrix
from .plan import LinearPlan, Plan


@dataclass(frozen=True)
class LayerSize:
    name: str  # blk.i.ssm_in
    kind: str  # ssm_in
    out_features: int
    in_features: int
    nnz: int  # non-zero weights (as stored: int8 may round a tiny weight to 0)
    dense: int
    csr: int
    ours: int


def layer_size(name: str, kind: str, lp: LinearPlan, dtype: str | None) -> LayerSize:
    fmt = formats.get(dtype)
    bw, scale_bytes = fmt.value_bytes, 4 if fmt.scaled else 0  # an fp32 scale per row
    out, n_in = lp.out_features, lp.in_features
    scales = out * scale_bytes
    if lp.packed:
        m = unpack_matrix(lp.blob)
        nnz = sum(int((c.values != 0).sum()) for c in m.classes)  # as stored: int8 may round a tiny w to 0
        ours = len(lp.blob)
    else:  # before pack: the blob pack would write
        rows = {0: out} if lp.dense else {c.n: len(c.rows) for c in lp.classes}
        nnz = int((lp.weight != 0).sum()) if lp.dense else sum(int((c.weight != 0).sum()) for c in lp.classes)
        ours = matrix_bytes(n_in, DTYPES[dtype or "f32"], rows)
    return LayerSize(name, kind, out, n_in, nnz, out * n_in * bw + scales, nnz * (bw + 4) + (out + 1) * 4 + scales, ours)


def plan_sizes(plan: Plan) -> list[LayerSize]:
    """One LayerSize per prunable layer (blk.i.ssm_in, ssm_x, ssm_dt, ssm_out)."""
    return [
        layer_size(f"blk.{i}.{k}", k, lp, plan.dtype)
        for i, b in enumerate(plan.blocks)
        for k, lp in b.linears.items()
    ]


def size_table(sizes: list[LayerSize]) -> str:
    """The table the CLI prints: each layer kind summed over the blocks, then the total."""
    kinds: dict[str, list[LayerSize]] = {}
    for s in sizes:
        kinds.setdefault(s.kind, []).append(s)
    rows = [(k, v) for k, v in kinds.items()] + [("total", sizes)]
    lines = [f"{'layers':10s} {'sparsity':>8s} {'dense':>12s} {'CSR':>12s} {'ours':>12s} {'dense/ours':>10s} {'CSR/ours':>9s}"]
    for k, v in rows:
        w = sum(s.out_features * s.in_features for s in v)
        nnz, dense, csr, ours = (sum(getattr(s, f) for s in v) for f in ("nnz", "dense", "csr", "ours"))
        lines.append(
            f"{k:10s} {1 - nnz / w:8.1%} {dense:12,d} {csr:12,d} {ours:12,d} {dense / ours:9.2f}x {csr / ours:8.2f}x"
        )
    return "\n".join(lines)
