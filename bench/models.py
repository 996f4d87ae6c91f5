"""The weights the speed benchmark runs: random Mamba-1 and Mamba-2 models of the published shapes, dense and
C_4^n-sparse (dense with exact zeros), written once as HF directories and cached under the work dir,
so llama.cpp (dense GGUF export), transformers and our compiler all read the SAME weights.

Sparse models mix rows of different n (weights removed per group of 4, as a learned ``c4`` prune
does) in a stated proportion, with random kept positions inside each group; the global sparsity over
the prunable projections (Mamba-1: in_proj, x_proj, dt_proj, out_proj; Mamba-2: in_proj, out_proj) is
made exact up to the granularity of one row of the layer with the fewest inputs (Mamba-1: a Δ row, R/4
weights; Mamba-2: an in_proj row, d/4), by moving a few such rows to the next n.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsamba import assets
from sparsamba.model.hf import build_model, read_config, read_weights, save_model
from sparsamba.model.mamba1 import Mamba1Config
from sparsamba.model.mamba2 import Mamba2Config
from sparsamba.prune.pattern import mask_from_scores, parse_pattern, removed_per_row

# bump when the generated weights change, so a cached directory from an older recipe is rebuilt
RECIPE_VERSION = 1
SEED = 0
PRUNABLE = ("in_proj", "x_proj", "dt_proj", "out_proj")
PRUNABLE2 = ("in_proj", "out_proj")  # Mamba-2

# the published Mamba-1 shapes (state-spaces/mamba-130m, -370m): N 16, expand 2, K 4, tied head,
# vocabulary 50280 (the GPT-NeoX tokenizer's 50277 rounded up to a multiple of 8)
SHAPES: dict[str, dict] = {
    "130m": dict(hidden_size=768, num_hidden_layers=24),
    "370m": dict(hidden_size=1024, num_hidden_layers=48),
}
COMMON = dict(vocab_size=50280, state_size=16, expand=2, conv_kernel=4, tie_word_embeddings=True)
# the published Mamba-2 shapes (state-spaces/mamba2-130m, -370m): N 128, head_dim 64, one group, expand
# 2, K 4, tied head, the same vocabulary
SHAPES2: dict[str, dict] = {
    "mamba2-130m": dict(hidden_size=768, num_hidden_layers=24, num_heads=24),
    "mamba2-370m": dict(hidden_size=1024, num_hidden_layers=48, num_heads=32),
}
COMMON2 = dict(
    vocab_size=50280,
    state_size=128,
    expand=2,
    head_dim=64,
    n_groups=1,
    conv_kernel=4,
    tie_word_embeddings=True,
)
ALL_SHAPES = [*SHAPES, *SHAPES2]


def _config(shape: str):
    return (
        Mamba2Config(**SHAPES2[shape], **COMMON2)
        if shape in SHAPES2
        else Mamba1Config(**SHAPES[shape], **COMMON)
    )


def _prunable(shape_or_cfg) -> tuple[str, ...]:
    m2 = shape_or_cfg in SHAPES2 if isinstance(shape_or_cfg, str) else shape_or_cfg.model_type == "mamba2"
    return PRUNABLE2 if m2 else PRUNABLE


# fraction of rows with each n (weights removed per group of 4); mean n / 4 = the sparsity
MIXES: dict[float, dict[int, float]] = {
    0.3: {1: 0.8, 2: 0.2},  # mean n 1.2
    0.5: {1: 0.25, 2: 0.5, 3: 0.25},  # mean n 2.0
    0.7: {2: 0.2, 3: 0.8},  # mean n 2.8
}


@dataclass(frozen=True)
class BenchModel:
    name: str  # "130m", "130m-c4-50", or a --pruned directory's name
    shape: str  # "130m" | "370m" | "pruned"
    sparsity: float  # over the prunable projections, measured from the weights
    path: Path  # HF-format directory
    mix: dict[int, float]  # fraction of prunable rows per n, measured


def mix_text(mix: dict[int, float]) -> str:
    # rows moved by the exactness correction (well under 1 %) are left out of the statement
    return " + ".join(f"{p:.0%} c4n{n}" for n, p in sorted(mix.items()) if p >= 0.005) or "dense"


def _tokenizer_dir() -> Path:
    # the embedded model's byte-level BPE (4096 tokens): export_gguf pads the GGUF vocabulary to 50280
    # with placeholder tokens, which is all llama-bench needs (it never tokenizes text)
    return assets.DEFAULT_MODEL


def _stamp(kind: dict) -> dict:
    return dict(recipe=RECIPE_VERSION, seed=SEED, **kind)


def _cached(d: Path, stamp: dict) -> dict | None:
    """The bench.json of a complete cached directory made by the same recipe, else None."""
    p = d / "bench.json"
    try:
        info = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if info.get("stamp") == stamp and (d / "model.safetensors").is_file() else None


def dense_model(shape: str, work: Path) -> BenchModel:
    d = work / "models" / shape
    m2 = shape in SHAPES2
    stamp = _stamp(dict(shape=shape, **(SHAPES2 if m2 else SHAPES)[shape], **(COMMON2 if m2 else COMMON)))
    if _cached(d, stamp) is None:
        torch.manual_seed(SEED)
        model = build_model(_config(shape))
        info = dict(stamp=stamp, sparsity=0.0, mix={})
        save_model(
            model,
            d,
            tokenizer_dir=_tokenizer_dir(),
            extra_files={"bench.json": json.dumps(info)},
            overwrite=True,
        )
    return BenchModel(shape, shape, 0.0, d, {})


def _row_n(out: int, mix: dict[int, float], gen: torch.Generator) -> torch.Tensor:
    """(out,) n per row: counts by largest remainder of mix · out, rows shuffled."""
    ns = sorted(mix)
    exact = [mix[n] * out for n in ns]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(ns)), key=lambda i: counts[i] - exact[i])[: out - sum(counts)]:
        counts[i] += 1
    n = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in zip(ns, counts)])
    return n[torch.randperm(out, generator=gen)]


def sparsify(
    sd: dict[str, torch.Tensor],
    n_layers: int,
    sparsity: float,
    seed: int,
    prunable: tuple[str, ...] = PRUNABLE,
) -> dict[int, float]:
    """Zero ``sd``'s prunable weights in place to exactly ``sparsity`` (see the module docstring).
    Returns the measured fraction of rows per n."""
    gen = torch.Generator().manual_seed(seed)
    mix = MIXES[sparsity]
    keys = [f"backbone.layers.{i}.mixer.{p}.weight" for i in range(n_layers) for p in prunable]
    row_n = {k: _row_n(sd[k].shape[0], mix, gen) for k in keys}
    total = sum(sd[k].numel() for k in keys)
    # every `in` is a multiple of 4 here, so a row of n removes exactly n · in / 4 weights
    removed = sum(int(row_n[k].sum()) * sd[k].shape[1] // 4 for k in keys)
    target = round(sparsity * total)
    # the correction: rows of the smallest `in` (Mamba-1: dt_proj's R), each step of n moves in/4 weights
    dts = [k for k in keys if sd[k].shape[1] == min(sd[j].shape[1] for j in keys)]
    step = sd[dts[0]].shape[1] // 4
    moves = round((target - removed) / step)
    sign = 1 if moves > 0 else -1
    for j in range(abs(moves)):
        k = dts[j % len(dts)]
        n = row_n[k]
        ok = torch.nonzero((n < 3) if sign > 0 else (n > 0)).flatten()
        r = ok[torch.randint(len(ok), (1,), generator=gen)]
        n[r] += sign
    for k in keys:
        W = sd[k]
        keep = mask_from_scores(torch.rand(W.shape, generator=gen), parse_pattern("c4"), n_removed=row_n[k])
        W.mul_(keep)  # exact zeros: the one contract from pruning to packing
    return _measure(sd, keys)[1]


def _measure(sd: dict[str, torch.Tensor], keys: list[str]) -> tuple[float, dict[int, float]]:
    """(sparsity over ``keys``, fraction of rows per n) read back from the zeros of the weights."""
    zeros = sum(int((sd[k] == 0).sum()) for k in keys)
    total = sum(sd[k].numel() for k in keys)
    ns = torch.cat([removed_per_row(sd[k].float()) for k in keys])
    rows = len(ns)
    mix = {int(n): int((ns == n).sum()) / rows for n in ns.unique()}
    return zeros / total, mix


def sparse_model(shape: str, sparsity: float, work: Path) -> BenchModel:
    dense = dense_model(shape, work)
    name = f"{shape}-c4-{round(sparsity * 100)}"
    d = work / "models" / name
    stamp = _stamp(dict(shape=shape, sparsity=sparsity, mix={str(k): v for k, v in MIXES[sparsity].items()}))
    info = _cached(d, stamp)
    if info is None:
        cfg = read_config(dense.path)
        model = build_model(cfg)
        sd = read_weights(dense.path)
        sd.pop("lm_head.weight", None)
        model.load_state_dict(sd, strict=False)
        model.lm_head.weight = model.backbone.embeddings.weight
        with torch.no_grad():
            mix = sparsify(
                dict(model.named_parameters()),
                cfg.num_hidden_layers,
                sparsity,
                SEED + round(sparsity * 100),
                _prunable(cfg),
            )
        keys = [
            f"backbone.layers.{i}.mixer.{p}.weight"
            for i in range(cfg.num_hidden_layers)
            for p in _prunable(cfg)
        ]
        measured, _ = _measure(dict(model.named_parameters()), keys)
        info = dict(stamp=stamp, sparsity=measured, mix={str(k): v for k, v in mix.items()})
        save_model(
            model,
            d,
            tokenizer_dir=_tokenizer_dir(),
            extra_files={"bench.json": json.dumps(info)},
            overwrite=True,
        )
    return BenchModel(name, shape, info["sparsity"], d, {int(k): v for k, v in info["mix"].items()})


def pruned_model(path: Path) -> BenchModel:
    """A real pruner output (HF directory, dense with zeros): its sparsity and n mix read from the zeros."""
    cfg = read_config(path)
    sd = read_weights(path)
    keys = [
        f"backbone.layers.{i}.mixer.{p}.weight" for i in range(cfg.num_hidden_layers) for p in _prunable(cfg)
    ]
    keys = [k for k in keys if k in sd]
    sparsity, mix = _measure(sd, keys) if keys else (0.0, {})
    return BenchModel(path.resolve().name, "pruned", sparsity, path, mix)
