"""Calibration statistics, gathered block by block (the SparseGPT / Wanda flow).

The calibration windows run through the model one block at a time; each block sees the outputs of
the blocks before it *as already pruned*, so the error of earlier blocks is what later ones
compensate. For every prunable ``nn.Linear`` of the block, forward hooks accumulate over all
calibration tokens x (in,):

    H   = Σ x xᵀ        (in, in)   the Hessian of the layer's squared output error (up to 2/n)
    sq  = Σ x²          (in,)      ‖X_j‖², whose square root is Wanda's activation norm

Mamba-1 prunes in_proj, x_proj, dt_proj and out_proj of every block, Mamba-2 in_proj and out_proj
(DESIGN.md §2); embeddings, LM head, conv1d, A_log, D and norms stay dense. Any other model
(a LLaMA-style transformers model) prunes every ``nn.Linear`` inside its repeated blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SparsambaError
from ..model.names import LINEARS

MAMBA_PRUNABLE = {arch: tuple(layers.values()) for arch, layers in LINEARS.items()}


@dataclass
class LayerStats:
    in_features: int
    H: torch.Tensor = field(repr=False)  # (in, in) float64: Σ x xᵀ
    sq: torch.Tensor = field(repr=False)  # (in,) float64: Σ x²
    tokens: int = 0

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
    pat = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        m = pat.search(name)
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


@torch.no_grad()
def collect_stats(run: Callable[[], None], layers: list[tuple[str, nn.Linear]]) -> dict[str, LayerStats]:
    """Accumulate ``LayerStats`` of ``layers`` while ``run()`` pushes the calibration data through."""
    stats = {n: LayerStats.empty(m.in_features, m.weight.device) for n, m in layers}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: stats[n].add(args[0])) for n, m in layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    for n, s in stats.items():
        s.check(n)
    return stats


class BlockWalker:
    """Runs calibration windows through a model one block at a time.

    For our Mamba references the hidden states between blocks are cached, so each block runs once
    per step of the walk. Any other model re-runs its full forward for each block (correct for any
    architecture, L times the cost)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 8):
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.native = (
            hasattr(model, "backbone") and hasattr(model.backbone, "layers") and hasattr(model, "step")
        )
        self.hidden: list[torch.Tensor] | None = None
        if self.native:
            with torch.no_grad():
                self.hidden = [model.backbone.embeddings(w).float() for w in self._batches()]

    def _batches(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.windows), self.batch_size):
            yield self.windows[i : i + self.batch_size]

    def _block_forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.model.backbone.layers[i]
        dtype = layer.mixer.in_proj.weight.dtype
        return h + layer.mixer(layer.norm(h).to(dtype))[0].float()

    @torch.no_grad()
    def stats(self, i: int, layers: list[tuple[str, nn.Linear]]) -> dict[str, LayerStats]:
        """Statistics of block ``i``'s layers, given the (pruned) blocks before it."""
        if self.native and i < len(self.model.backbone.layers):
            return collect_stats(lambda: [self._block_forward(i, h) for h in self.hidden], layers)
        return collect_stats(lambda: [self.model(w) for w in self._batches()], layers)

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Move the cached hidden states past block ``i`` (call after pruning it)."""
        if self.native and i < len(self.model.backbone.layers):
            self.hidden = [self._block_forward(i, h) for h in self.hidden]
