"""Calibration statistics, gathered block by block (the SparseGPT / Wanda flow).

The calibration windows run through the model one block at a time; each block sees the outputs of
the blocks before it *as already pruned*, so the error of earlier blocks is what later ones
compensate. For every prunable ``nn.Linear`` of the block, forward hooks accumulate over all
calibration tokens x (in,):

    H   = Σ x xᵀ        (in, in)   the Hessian of the layer's squared output error (up to 2/n)
    sq  = Σ x²          (in,)      ‖X_j‖², whose square root is Wanda's activation norm

Mamba-1 prunes in_proj, x_proj, dt_proj and out_proj of every block, Mamba-2 in_proj and out_proj
(docs/DESIGN.md §2); embeddings, LM head, conv1d, A_log, D and norms stay dense. Any other model
(a LLaMA-style transformers model) prunes every ``nn.Linear`` inside its repeated blocks.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparsambaError
from ..model.names import LINEARS

MAMBA_PRUNABLE = {arch: tuple(layers.values()) for arch, layers in LINEARS.items()}
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # a block's layers are named '….layers.<i>.…'


@dataclass
class LayerStats:
    in_features: int
    H: torch.Tensor = field(repr=False)  # (in, in) float64: Σ x xᵀ
    sq: torch.Tensor = field(repr=False)  # (in,) float64: Σ x²
    tokens: int = 0
    G: torch.Tensor | None = field(default=None, repr=False)  # (in, in) float64: X_pᵀX_d (dense walk)

    @classmethod
    def empty(cls, n: int, device) -> LayerStats:
        z = torch.zeros
        return cls(n, z(n, n, dtype=torch.float64, device=device), z(n, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # (tokens, in)
        self.H.addmm_(x.T, x)
        self.sq.add_((x * x).sum(0))
        self.tokens += x.shape[0]

    @property
    def x_norm(self) -> torch.Tensor:  # (in,) ‖X_j‖₂
        return self.sq.sqrt()

    def check(self, name: str) -> None:
        if not (torch.isfinite(self.H).all() and torch.isfinite(self.sq).all()):
            raise SparsambaError(
                f"{name}: calibration statistics contain NaN or inf; the model's activations overflow "
                "on the calibration data (check the weights, or calibrate in float32)"
            )


def prunable_layers(model: nn.Module, include_lm_head: bool = False) -> list[list[tuple[str, nn.Linear]]]:
    """The prunable linear layers, grouped by block in forward order: [[(name, module), ...], ...]."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    groups: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        m = _BLOCK.search(name)
        if m is None:
            continue
        if mt in MAMBA_PRUNABLE and name.rsplit(".", 1)[-1] not in MAMBA_PRUNABLE[mt]:
            continue
        groups.setdefault(int(m.group(1)), []).append((name, mod))
    out = [groups[i] for i in sorted(groups)]
    if include_lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        out.append([("lm_head", model.lm_head)])
    if not out:
        raise SparsambaError(
            f"{type(model).__name__}: no prunable linear layers found (looked for nn.Linear inside "
            "'layers.<i>.' blocks); sparsamba prunes Mamba / Mamba-2 and LLaMA-style decoder models"
        )
    return out


class _Stop(Exception):
    """Raised by a hook once everything it needs from a batch is captured: the rest of the forward
    (for in_proj the whole selective scan, for a generic model the later blocks) need not run."""


def _until_stop(fn: Callable[[], object]) -> None:
    try:
        fn()
    except _Stop:
        pass


def block_name(layers: list[tuple[str, nn.Linear]]) -> str | None:
    """The module path of the block holding ``layers`` ('model.layers.3'); None for the LM head."""
    m = _BLOCK.search(layers[0][0])
    return layers[0][0][: m.end() - 1] if m else None


class BlockWalker:
    """Runs calibration windows through a model one block at a time.

    For our Mamba references the hidden states between blocks are cached, so each block runs once
    per step of the walk. Any other model re-runs its forward for each block, stopped as soon as the
    block's inputs are captured (correct for any architecture).

    ``dense=True`` walks a dense copy of the model beside it on the same windows: ``stats`` then also
    gives G = X_pᵀX_d per layer (dense_target.py), and ``block_io`` the dense block's outputs that a
    reconstruction of the pruned block aims at."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 8, dense: bool = False):
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.dense = copy.deepcopy(model) if dense else None
        self.native = (
            hasattr(model, "backbone") and hasattr(model.backbone, "layers") and hasattr(model, "step")
        )
        self.hidden: dict[int, list[torch.Tensor]] = {}  # id(model) -> (b, l, d) per batch, before the block
        if self.native:
            with torch.no_grad():
                h = [model.backbone.embeddings(w).float() for w in self._batches()]
            self.hidden[id(model)] = h
            if self.dense is not None:
                self.hidden[id(self.dense)] = [x.clone() for x in h]

    def _batches(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.windows), self.batch_size):
            yield self.windows[i : i + self.batch_size]

    def _in_cache(self, i: int) -> bool:
        return self.native and i < len(self.model.backbone.layers)

    @staticmethod
    def _block_forward(model: nn.Module, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = model.backbone.layers[i]
        dtype = layer.mixer.in_proj.weight.dtype
        return h + layer.mixer(layer.norm(h).to(dtype))[0].float()

    def _run(self, model: nn.Module, i: int) -> Iterator[Callable[[], object]]:
        """One callable per batch pushing it through block i (cached) or the whole model."""
        if self._in_cache(i):
            for h in self.hidden[id(model)]:
                yield lambda h=h: self._block_forward(model, i, h)
        else:
            for w in self._batches():
                yield lambda w=w: model(w)

    @torch.no_grad()
    def stats(self, i: int, layers: list[tuple[str, nn.Linear]]) -> dict[str, LayerStats]:
        """Statistics of block ``i``'s layers, given the (pruned) blocks before it."""
        stats = {n: LayerStats.empty(m.in_features, m.weight.device) for n, m in layers}
        xd: dict[str, torch.Tensor] = {}  # the dense copy's input of each layer, this batch
        seen: set[str] = set()

        def dense_hook(n: str):
            def hook(mod, args):
                xd[n] = args[0].reshape(-1, args[0].shape[-1]).double()
                if len(xd) == len(stats):
                    raise _Stop

            return hook

        def hook(n: str):
            def fn(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                stats[n].add(x)
                if n in xd:
                    if stats[n].G is None:
                        stats[n].G = torch.zeros_like(stats[n].H)
                    stats[n].G.addmm_(x.T, xd[n])
                seen.add(n)
                if len(seen) == len(stats):
                    raise _Stop

            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
        if self.dense is not None:
            dmods = dict(self.dense.named_modules())
            handles += [dmods[n].register_forward_pre_hook(dense_hook(n)) for n, _ in layers]
        try:
            runs = self._run(self.model, i)
            druns = self._run(self.dense, i) if self.dense is not None else None
            for run in runs:
                xd.clear()
                seen.clear()
                if druns is not None:
                    _until_stop(next(druns))
                _until_stop(run)
        finally:
            for h in handles:
                h.remove()
        for n, s in stats.items():
            s.check(n)
        return stats

    @torch.no_grad()
    def block_io(self, i: int, name: str) -> tuple[Callable[[int], torch.Tensor], list[torch.Tensor]]:
        """(run, targets) for a reconstruction of block ``i`` (module path ``name``): run(k) is the
        pruned block's output on its k-th batch of inputs, targets[k] the dense block's output on
        the dense inputs. Needs ``dense=True``."""
        if self._in_cache(i):
            hp, hd = self.hidden[id(self.model)], self.hidden[id(self.dense)]
            targets = [self._block_forward(self.dense, i, h) for h in hd]
            return (lambda k: self._block_forward(self.model, i, hp[k])), targets
        block, dblock = self.model.get_submodule(name), self.dense.get_submodule(name)
        inputs: list[tuple[tuple, dict]] = []
        targets = []

        def take_output(mod, args, kwargs, out):
            targets.append((out[0] if isinstance(out, tuple) else out).float())
            raise _Stop

        def take_input(mod, args, kwargs):
            # the replay must not grow a KV cache
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            inputs.append((args, kwargs))
            raise _Stop

        handles = [
            dblock.register_forward_hook(take_output, with_kwargs=True),
            block.register_forward_pre_hook(take_input, with_kwargs=True),
        ]
        try:
            for w in self._batches():
                _until_stop(lambda w=w: self.dense(w))
                _until_stop(lambda w=w: self.model(w))
        finally:
            for h in handles:
                h.remove()

        def run(k: int) -> torch.Tensor:
            out = block(*inputs[k][0], **inputs[k][1])
            return out[0] if isinstance(out, tuple) else out

        return run, targets

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Move the cached hidden states past block ``i`` (call after pruning it)."""
        if self._in_cache(i):
            for m in (self.model, self.dense) if self.dense is not None else (self.model,):
                self.hidden[id(m)] = [self._block_forward(m, i, h) for h in self.hidden[id(m)]]


def output_fisher(
    model: nn.Module,
    windows: torch.Tensor,
    layers: list[tuple[str, nn.Linear]],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """{name: (out,) float64} F_r, the mean over calibration tokens of (∂L/∂y_r)², y = the layer's
    output, L = the summed next-token cross-entropy (each token's gradient at its own scale). Weights
    are not touched; only the input embedding requires grad meanwhile, so ∂L/∂y covers every path."""
    from ..progress import progress as progress_bar

    acc = {n: torch.zeros(m.out_features, dtype=torch.float64, device=m.weight.device) for n, m in layers}
    tokens = 0

    def hook(name: str):
        def fwd(mod, args, out):
            def grad_hook(g: torch.Tensor) -> None:  # returns None: a returned tensor would replace the grad
                acc[name].add_(g.double().square().flatten(0, -2).sum(0))

            out.register_hook(grad_hook)

        return fwd

    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    leaves = [emb.weight] if emb is not None else list(model.parameters())
    was = [p.requires_grad for p in leaves]
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    starts = range(0, len(windows), batch_size)
    try:
        for p in leaves:
            p.requires_grad_(True)
        with torch.enable_grad():
            for s in progress_bar(starts, desc="loss gradients", unit="batches", enabled=progress):
                w = windows[s : s + batch_size]
                out = model(w)
                lg = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
                F.cross_entropy(lg.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").backward()
                tokens += w.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(leaves, was):
            p.requires_grad_(r)
            p.grad = None
    return {n: a / tokens for n, a in acc.items()}
