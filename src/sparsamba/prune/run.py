"""The pruning driver: one walk over the model's blocks for every method. What a run does is a
``PruneConfig`` (config.py, checked when built); how each method chooses a layer's mask is its entry
in ``methods.METHODS``; the numerics live in scores.py, sparsegpt.py, compensate.py, alloc.py,
learn.py and dense_target.py. This file only orders them: the method's plan (c4: dense statistics,
n per row), then block by block statistics -> dense target W* -> select -> (compensate) -> write
back -> (reconstruct the block), then the report that becomes sparsity.json.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import SparsambaError
from .calibrate import BlockWalker, block_name, prunable_layers
from .compensate import compensate as compensate_weights
from .compensate import reconstruction_error
from .config import PruneConfig
from .dense_target import dense_target_weights, reconstruct
from .methods import METHODS
from .pattern import layer_report, model_report


def prune_model(
    model: nn.Module, windows: torch.Tensor, cfg: PruneConfig, progress: bool = True, log=print
) -> dict:
    """Prune ``model`` in place with calibration ``windows`` (n, seqlen); returns the report that
    becomes ``sparsity.json``."""
    from ..progress import progress as progress_bar

    pattern, method = cfg.pattern, METHODS[cfg.method]
    t0 = time.time()
    layers = prunable_layers(model, cfg.include_lm_head)
    for block in layers:
        for name, mod in block:
            if not torch.isfinite(mod.weight).all():
                raise SparsambaError(
                    f"{name}: the weight holds NaN or inf; the model is broken, nothing was pruned"
                )
    compensate = cfg.compensating
    timings: dict[str, float] = {}
    notes: dict = {}  # what the plan reports (c4: the learning's diagnostics)
    plans = {}
    if method.plan is not None:
        plans = method.plan(model, windows, layers, pattern, cfg, progress, log, timings, notes)

    t = time.time()
    # a dense copy walks beside the model when anything aims at the dense outputs
    walker = BlockWalker(model, windows, dense=cfg.dense_target or cfg.reconstruct > 0)
    errors, recon, t_rec = {}, {}, 0.0
    desc = "prune" + (" + compensate" if compensate else "") + (" + reconstruct" if cfg.reconstruct else "")
    for b, block in enumerate(progress_bar(layers, desc=desc, unit="blocks", enabled=progress)):
        stats = walker.stats(b, block) if not cfg.true_sequential else {}
        masks = {}
        for name, mod in block:
            if cfg.true_sequential:  # this layer's inputs as produced by the already pruned layers before it
                stats.update(walker.stats(b, [(name, mod)]))
            st = stats[name]
            W = mod.weight.detach()
            if cfg.dense_target:  # the weight whose outputs on the pruned inputs are the dense outputs
                W = dense_target_weights(W, st.H, st.G, cfg.compensate_damp)
            mask, new = method.select(W, st, pattern, cfg, plans.get(name))
            if (
                new is None
            ):  # a mask alone: apply it, re-solving the kept weights if asked (docs/DESIGN.md §5)
                new = (
                    compensate_weights(W, st.H, mask, damp=cfg.compensate_damp, debug=cfg.debug, name=name)
                    if compensate
                    else W * mask
                )
            masks[name] = mask
            errors[name] = reconstruction_error(W, new, st.H)
            if cfg.debug and not compensate:  # compensate prints its own before / after line
                log(f"{name}: relative reconstruction error {errors[name]:.4e}")
            with torch.no_grad():
                mod.weight.copy_(new.to(mod.weight.dtype))
        where = block_name(block)
        if cfg.reconstruct and where is not None:
            t1 = time.time()
            run, targets = walker.block_io(b, where)
            keep = {name: (mod.weight, masks[name].to(mod.weight.device)) for name, mod in block}
            before, after = reconstruct(run, targets, keep, cfg.reconstruct, cfg.reconstruct_lr, seed=b)
            recon[where] = {"mse_before": before, "mse_after": after}
            if cfg.debug:
                log(f"{where}: reconstruction MSE {before:.4g} -> {after:.4g}")
            t_rec += time.time() - t1
        walker.advance(b)
    if cfg.reconstruct:
        timings["reconstruct_s"] = t_rec
    timings["prune_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    reports = [layer_report(n, m.weight.detach(), pattern) for block in layers for n, m in block]
    rep = model_report(reports)
    rep.update(
        method=cfg.method,
        pattern=str(pattern),
        target={
            "sparsity": cfg.sparsity,
            "scope": cfg.scope,
            "latency": cfg.latency,
            "loss_budget": cfg.loss_budget,
        },
        compensate=compensate,
        dense_target=cfg.dense_target,
        learning=notes or None,
        reconstruction=recon or None,
        calibration={"windows": len(windows), "seqlen": windows.shape[1]},
        config=cfg.to_dict(),
        reconstruction_error=errors,
        seconds={k: round(v, 2) for k, v in timings.items()},
    )
    return rep
