"""The pruning driver: one walk over the model's blocks for every method. What a run does is a
``PruneConfig`` (config.py, checked when built); how each method chooses a layer's mask is its entry
in ``methods.METHODS``; the numerics live in scores.py, sparsegpt.py, compensate.py and learn.py.
This file only orders them: the method's plan (c4: dense statistics, learned n), then block by block
statistics -> select -> (compensate) -> write back, then the report that becomes sparsity.json.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import SparsambaError
from .calibrate import BlockWalker, prunable_layers
from .compensate import compensate as compensate_weights
from .compensate import reconstruction_error
from .config import PruneConfig
from .methods import METHODS
from .pattern import layer_report, model_report


def prune_model(
    model: nn.Module, windows: torch.Tensor, cfg: PruneConfig, progress: bool = True, log=print
) -> dict:
    """Prune ``model`` in place with calibration ``windows`` (n, seqlen); returns the report that
    becomes ``sparsity.json``."""
    from tqdm import tqdm

    pattern, method = cfg.pattern, METHODS[cfg.method]
    t0 = time.time()
    layers = prunable_layers(model, cfg.include_lm_head)
    for block in layers:
        for name, mod in block:
            if not torch.isfinite(mod.weight).all():
                raise SparsambaError(
                    f"{name}: the weight holds NaN or inf; the model is broken, nothing was pruned"
                )
    compensate = cfg.compensate if cfg.compensate is not None else method.compensate
    timings: dict[str, float] = {}
    plans = {}
    if method.plan is not None:
        plans = method.plan(model, windows, layers, pattern, cfg, progress, log, timings)

    t = time.time()
    walker = BlockWalker(model, windows)
    errors = {}
    for b, block in enumerate(
        tqdm(layers, desc="prune" + (" + compensate" if compensate else ""), disable=not progress)
    ):
        stats = walker.stats(b, block) if not cfg.true_sequential else {}
        for name, mod in block:
            if cfg.true_sequential:  # this layer's inputs as produced by the already pruned layers before it
                stats.update(walker.stats(b, [(name, mod)]))
            W = mod.weight.detach()
            st = stats[name]
            mask, new = method.select(W, st, pattern, cfg, plans.get(name))
            if new is None:  # a mask alone: apply it, re-solving the kept weights if asked (DESIGN.md §5)
                new = (
                    compensate_weights(W, st.H, mask, damp=cfg.compensate_damp, debug=cfg.debug, name=name)
                    if compensate
                    else W * mask
                )
            errors[name] = reconstruction_error(W, new, st.H)
            if cfg.debug and not compensate:  # compensate prints its own before / after line
                log(f"{name}: relative reconstruction error {errors[name]:.4e}")
            with torch.no_grad():
                mod.weight.copy_(new.to(mod.weight.dtype))
        walker.advance(b)
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
        calibration={"windows": len(windows), "seqlen": windows.shape[1]},
        config=cfg.to_dict(),
        reconstruction_error=errors,
        seconds={k: round(v, 2) for k, v in timings.items()},
    )
    return rep
