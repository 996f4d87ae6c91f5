"""Sparse learning: choose n ∈ {0..4} for every row (Algorithm 1 of the paper, as docs/DESIGN.md §4 defines it).

Weights stay frozen. Each prunable row r (or block of ``row_block`` rows) has logits α_r ∈ R⁵ over
n = 0..4; with p_r = softmax(α_r / τ) the layer trains with the expected weight

    W_eff[r] = Σ_n p_r,n · (W[r] ⊙ M_n[r])  =  W[r] ⊙ Σ_{n : j kept by M_n} p_r,n

where M_n keeps the 4 − n highest-scoring weights of each group of 4. The masks are nested, so a weight
of within-group rank k (0 = best) is kept by M_0..M_{3−k}: its soft mask is a prefix sum of p, and no
five copies of W are ever stored.

Loss = KL(dense logits ‖ sparse logits) per token (the effectiveness loss, distilling the dense model)
+ λ · (E[constraint] − target)², with the constraint the expected sparsity (per block, as the paper
prunes uniformly per block, or global) or the expected latency from a measured table. SGD, lr 0.1,
×0.1 every 200 steps, 1000 steps by default. The output is argmax_n α plus a greedy fix-up that meets
the target exactly: rows move to the neighbouring n they prefer most (smallest logit gap) until the
count of removed weights reaches the target.
"""

from __future__ import annotations

import heapq
import math
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparsambaError
from .pattern import group_masks


@dataclass
class LearnConfig:
    steps: int = 1000
    lr: float = 0.1
    decay_every: int = 200
    decay: float = 0.1
    tau: float = 1.0
    batch_size: int = 1  # calibration windows per step (the paper: 1)
    penalty: float = 50.0  # λ of the constraint term
    row_block: int = 1  # rows sharing one n (4 or 8 for wider SIMD)
    prior_scale: float = 10.0  # logits start at −prior_scale × (relative score removed at n)
    seed: int = 0

    def __post_init__(self) -> None:
        # checked once, here: a negative step count or a zero row block fails before any work
        counts = {"steps": 0, "decay_every": 1, "batch_size": 1, "row_block": 1}
        for k, lo in counts.items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SparsambaError(f"learn: {k} must be a whole number >= {lo}, got {v!r}")
        for k in ("lr", "tau", "decay", "penalty", "prior_scale"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SparsambaError(f"learn: {k} must be a finite number >= 0, got {v!r}")
        if self.tau == 0:
            raise SparsambaError("learn: tau (the softmax temperature) must be > 0")


@dataclass
class LayerChoice:
    """Everything about one layer that learning and the fix-up need."""

    name: str
    module: nn.Linear
    block: int  # index of the model block it belongs to (the scope of a per-block target)
    keep_count: torch.Tensor  # (out, in) uint8: in how many of M_0..M_4 the weight is kept (4 − rank)
    removed: torch.Tensor  # (5,) float: weights removed from one row at n = 0..4
    prior: torch.Tensor  # (out, 5): the row's pruned score at each n, relative to the layer's mean row
    cost: torch.Tensor | None = None  # (5,) float: latency of one row at n = 0..4 (latency targets)
    logits: torch.Tensor | None = None  # (rows / row_block, 5) α

    @property
    def out(self) -> int:
        return self.module.out_features


def make_choice(name: str, module: nn.Linear, block: int, scores: torch.Tensor) -> LayerChoice:
    gm = group_masks(scores)  # (5, out, in) bool, M_n
    keep_count = gm.sum(0).to(torch.uint8)
    removed = torch.tensor(
        [float(module.in_features - gm[n, 0].sum()) for n in range(5)], device=scores.device
    )
    sc = scores.float()
    lost = torch.stack([(sc * ~gm[n]).sum(1) for n in range(5)], 1)  # (out, 5): score removed at n
    prior = lost / (sc.sum() / sc.shape[0]).clamp_min(1e-30)
    return LayerChoice(name, module, block, keep_count, removed, prior)


def _row_probs(c: LayerChoice, tau: float, row_block: int) -> torch.Tensor:
    p = torch.softmax(c.logits / tau, -1)  # (rows / row_block, 5)
    return p.repeat_interleave(row_block, 0)[: c.out]  # (out, 5)


def _soft_mask(c: LayerChoice, p: torch.Tensor) -> torch.Tensor:
    # prefix[:, k] = Σ_{n < k} p_n: the probability that a weight kept by M_0..M_{k-1} survives
    prefix = F.pad(torch.cumsum(p, -1), (1, 0))  # (out, 6)
    return torch.gather(prefix, 1, c.keep_count.long())  # (out, in)


class _Patched:
    """Swap the forward of every chosen layer for one using W ⊙ soft_mask(α) while ``active``."""

    def __init__(self, choices: list[LayerChoice], cfg: LearnConfig):
        self.active = False
        self.choices, self.cfg = choices, cfg

    def __enter__(self):
        for c in self.choices:

            def fwd(mod, x, c=c):
                if not self.active:
                    return F.linear(x, mod.weight, mod.bias)
                mask = _soft_mask(c, _row_probs(c, self.cfg.tau, self.cfg.row_block))
                return F.linear(x, mod.weight * mask.to(mod.weight.dtype), mod.bias)

            c.module.forward = types.MethodType(fwd, c.module)
        return self

    def __exit__(self, *exc):
        for c in self.choices:
            del c.module.forward  # back to the class's forward


@dataclass
class Target:
    kind: str  # "sparsity" | "latency"
    value: float  # sparsity in [0, 1), or latency in the table's unit
    scope: str = "block"  # sparsity: "block" (uniform per block) or "global"


def _expected(choices: list[LayerChoice], probs: list[torch.Tensor], target: Target) -> list[torch.Tensor]:
    """The constraint's expected value(s), one per scope."""
    if target.kind == "latency":
        return [sum((p @ c.cost).sum() for c, p in zip(choices, probs)) / target.value]
    scopes: dict[int, list] = {}
    for c, p in zip(choices, probs):
        key = c.block if target.scope == "block" else 0
        num, den = scopes.get(key, (0.0, 0.0))
        scopes[key] = (num + (p @ c.removed).sum(), den + c.out * c.module.in_features)
    return [num / den for num, den in scopes.values()]


def learn_logits(
    model: nn.Module,
    windows: torch.Tensor,
    choices: list[LayerChoice],
    target: Target,
    cfg: LearnConfig,
    progress: bool = True,
    log=print,
) -> None:
    """Train the logits of ``choices`` in place (weights frozen)."""
    from ..progress import progress as progress_bar

    g = torch.Generator().manual_seed(cfg.seed)
    for c in choices:
        # start from the local OBS estimate of each row's cost at each n (rows of a block share the
        # mean), so that the global loss only has to correct it; zeros would start every row equal
        rows = math.ceil(c.out / cfg.row_block)
        prior = F.pad(c.prior, (0, 0, 0, rows * cfg.row_block - c.out)).view(rows, cfg.row_block, 5).mean(1)
        c.logits = (-cfg.prior_scale * prior).requires_grad_(True)
    params = [c.logits for c in choices]
    opt = torch.optim.SGD(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, cfg.decay_every, cfg.decay)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    goal = 1.0 if target.kind == "latency" else target.value
    t0 = time.time()
    try:
        with _Patched(choices, cfg) as patch:
            bar = progress_bar(range(cfg.steps), desc="learn", unit="steps", enabled=progress)
            for step in bar:
                idx = torch.randint(0, len(windows), (cfg.batch_size,), generator=g)
                batch = windows[idx]
                patch.active = False
                with torch.no_grad():
                    dense = F.log_softmax(model(batch).float(), -1)
                patch.active = True
                sparse = F.log_softmax(model(batch).float(), -1)
                kl = F.kl_div(
                    sparse.flatten(0, 1), dense.flatten(0, 1), log_target=True, reduction="batchmean"
                )
                probs = [_row_probs(c, cfg.tau, cfg.row_block) for c in choices]
                cons = torch.stack(_expected(choices, probs, target))
                loss = kl + cfg.penalty * ((cons - goal) ** 2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step % 50 == 0 or step + 1 == cfg.steps:
                    what = "latency" if target.kind == "latency" else "expected sparsity"
                    bar.set_postfix_str(f"KL {kl.item():.4f}, {what} {cons.mean().item():.3f} → {goal:.3f}")
    finally:
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)
    log(f"learned C_4^n logits for {len(choices)} layers in {time.time() - t0:.1f} s")


def _rows_n(c: LayerChoice, row_block: int) -> torch.Tensor:
    return c.logits.detach().argmax(-1)  # (rows / row_block,)


def fixup(choices: list[LayerChoice], target: Target, row_block: int) -> dict[str, torch.Tensor]:
    """argmax_n α, then greedy moves of single rows (blocks) to a neighbouring n until the target
    is met exactly (to one row's worth of weights or latency). Returns n_removed (out,) per layer."""
    ns = {c.name: _rows_n(c, row_block).clone() for c in choices}
    sizes = {c.name: [min(row_block, c.out - i * row_block) for i in range(len(ns[c.name]))] for c in choices}

    def unit(c: LayerChoice) -> torch.Tensor:  # what one row contributes at each n
        return c.cost if target.kind == "latency" else c.removed

    scopes: dict[int, list[LayerChoice]] = {}
    for c in choices:
        scopes.setdefault(
            c.block if (target.kind == "sparsity" and target.scope == "block") else 0, []
        ).append(c)
    for members in scopes.values():
        if target.kind == "latency":  # latency is one global budget
            goal = target.value
        else:
            goal = target.value * sum(c.out * c.module.in_features for c in members)
        cur = sum(
            float(sum(unit(c)[n] * s for n, s in zip(ns[c.name].tolist(), sizes[c.name]))) for c in members
        )
        up = (cur < goal) if target.kind == "sparsity" else (cur > goal)  # more pruning needed?
        step = 1 if up else -1
        heap = []
        for ci, c in enumerate(members):
            lg = c.logits.detach()
            for r, n in enumerate(ns[c.name].tolist()):
                if 0 <= n + step <= 4:
                    heapq.heappush(heap, (float(lg[r, n] - lg[r, n + step]), ci, r))
        while heap:
            if target.kind == "sparsity" and ((up and cur >= goal) or (not up and cur <= goal)):
                break
            if target.kind == "latency" and ((up and cur <= goal) or (not up and cur >= goal)):
                break
            _, ci, r = heapq.heappop(heap)
            c = members[ci]
            n = int(ns[c.name][r])
            delta = float(unit(c)[n + step] - unit(c)[n]) * sizes[c.name][r]
            ns[c.name][r] = n + step
            cur += delta
            lg = c.logits.detach()
            if 0 <= n + 2 * step <= 4:
                heapq.heappush(heap, (float(lg[r, n + step] - lg[r, n + 2 * step]), ci, r))
        if target.kind == "sparsity" and up and cur < goal - 1e-9:
            raise SparsambaError(
                f"cannot reach sparsity {target.value:.3f}: every row is already removed entirely in block scope"
            )
    return {c.name: ns[c.name].repeat_interleave(row_block)[: c.out] for c in choices}
