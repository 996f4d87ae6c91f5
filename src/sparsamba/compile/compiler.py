"""``compile_model``: an HF-format Mamba-1 / Mamba-2 directory -> the packed GGUF, the verifier between passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import formats
from ..errors import SparsambaError
from .passes import PASSES, run_pass
from .plan import Plan, load_source, plan_from_state
from .sizes import LayerSize, plan_sizes
from .verify import check_plan, sample_ids, verify


@dataclass
class CompileReport:
    path: Path | None  # the file written; None when stopped by dump_after
    dtype: str
    errors: dict[str, float] = field(default_factory=dict)  # stage -> max relative logit error vs the source
    sizes: list[LayerSize] = field(default_factory=list)  # of the last plan
    dump: str | None = None  # the summary printed for dump_after
    seconds: float = 0.0
    plan: Plan | None = None  # the last plan


def summarize(plan: Plan) -> str:
    """A readable summary of a plan: per block and layer, dense or its classes with row counts, and π."""
    dm = plan.dims
    m2 = getattr(dm, "arch", "mamba") == "mamba2"
    shape = f"h {dm.n_heads}, p {dm.head_dim}, g {dm.n_groups}" if m2 else f"R {dm.dt_rank}"
    lines = [
        f"plan of {plan.name} after {', '.join(plan.passes) or 'loading'}: {dm.n_layer} blocks, d {dm.d_model}, "
        f"d_inner {dm.d_inner}, N {dm.d_state}, {shape}, K {dm.d_conv}, vocab {dm.vocab_size}, "
        f"{'tied' if dm.tied else 'untied'} head, dtype {plan.dtype or 'fp32 (unpacked)'}, "
        f"norm {'folded into ssm_in' if plan.norm_folded else 'separate'}"
    ]
    for i, b in enumerate(plan.blocks):
        if b.perm is None or bool((b.perm == torch.arange(dm.d_inner)).all()):
            pi = "identity"
        else:
            pi = f"permuted ({int((b.perm != torch.arange(dm.d_inner)).sum())} channels moved)"
        lines.append(f"blk.{i}  π {pi}")
        for k, lp in b.linears.items():
            shape = f"({lp.out_features}, {lp.in_features})"
            if lp.dense:
                desc = "dense"
            else:
                removed = lp.out_features - sum(len(c.rows) for c in lp.classes)
                parts = [f"n={c.n}: {len(c.rows)} rows" for c in lp.classes]
                desc = "packed " + ", ".join(parts + [f"n=4 (removed): {removed} rows"])
            if lp.packed:
                desc += f" (v2 blob, {len(lp.blob):,} bytes)"
            lines.append(f"  {k:8s} {shape:12s} {desc}")
    return "\n".join(lines)


def compile_model(
    model_dir: str | Path,
    out_path: str | Path,
    dtype: str = "f16",
    dump_after: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> CompileReport:
    """Compile ``model_dir`` (HF-format Mamba-1 or Mamba-2, dense or pruned) into the packed GGUF ``out_path``.

    Runs reorder, fold, fuse and pack(dtype) with the verifier after each (the plan's logits against the
    source model's on a few random tokens). ``dump_after`` = a pass name: summarize the plan after that
    pass (``CompileReport.dump``) and stop there, writing nothing. The file is written atomically.
    """
    from ..outputs import check_output
    from .packed_gguf import read_packed, write_packed

    t0 = time.time()
    say = log or (lambda _m: None)
    formats.get(dtype)
    if dump_after is not None and dump_after not in PASSES:
        raise SparsambaError(f"--dump-after {dump_after!r}: the passes are {', '.join(PASSES)}")
    out = Path(out_path)
    if dump_after is None:
        check_output(out, overwrite, file=True)  # before any work, not after it
    d, model, tok = load_source(model_dir)
    cfg = model.config
    plan = plan_from_state(model, d.resolve().name, tok)
    ids = sample_ids(cfg.vocab_size)
    with torch.no_grad():
        ref = model(ids).float()  # (b, l, V): the source model is the spec
    rep = CompileReport(None, dtype)
    rep.errors["load"] = verify(plan, "load", ids, ref)
    say(f"loaded {d}: {cfg.num_hidden_layers} blocks, max rel. logit error of the plan {rep.errors['load']:.2g}")
    for name in PASSES:
        plan = run_pass(plan, name, dtype)
        rep.errors[name] = verify(plan, name, ids, ref)
        say(f"{name:8s} done, max rel. logit error {rep.errors[name]:.2g} (bound {formats.get(plan.dtype).tolerance:g})")
        if name == dump_after:
            rep.dump = summarize(plan)
            break
    rep.plan, rep.sizes = plan, plan_sizes(plan)
    if dump_after is None:
        rep.path = write_packed(plan, out, overwrite=overwrite)
        back = read_packed(rep.path)  # what the engine will read, run by the reference once more
        rep.errors["file"] = verify(back, "writing the file", ids, ref)
        check_plan(back, "reading the file back")
        say(f"wrote {rep.path}: {rep.path.stat().st_size:,} bytes, max rel. logit error {rep.errors['file']:.2g}")
    rep.seconds = time.time() - t0
    return rep
