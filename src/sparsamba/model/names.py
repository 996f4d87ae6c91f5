"""HF (transformers) ↔ GGUF (llama.cpp) tensor names and layouts, per architecture: the one name map
that the exporter, its reader, the compiler, the pruner and the profiler read.

    GGUF                      HF                                   layout change HF -> GGUF
    token_embd.weight         backbone.embeddings.weight
    output_norm.weight        backbone.norm_f.weight
    output.weight             lm_head.weight                       (only when untied)
    blk.{i}.<suffix>          backbone.layers.{i}.<BLOCK[arch][suffix]>
        ssm_conv1d.weight     mixer.conv1d.weight                  (C, 1, K) -> (C, K)
        ssm_a                 mixer.A_log                          A = -exp(A_log); Mamba-2 (h,) -> (h, 1)
        ssm_d                 mixer.D                              Mamba-2 (h,) -> (h, 1)
        ssm_norm.weight       mixer.norm.weight  (Mamba-2)         (di,) -> (g, di/g), one row per group
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a layout changes: the profiler reads the names without it
    from torch import Tensor

GLOBAL = {
    "token_embd.weight": "backbone.embeddings.weight",
    "output_norm.weight": "backbone.norm_f.weight",
    "output.weight": "lm_head.weight",
}

# the prunable matrices of a block, in forward order (the engine's and the profiler's order):
# GGUF layer -> HF module under mixer.
LINEARS = {
    "mamba": {"ssm_in": "in_proj", "ssm_x": "x_proj", "ssm_dt": "dt_proj", "ssm_out": "out_proj"},
    "mamba2": {"ssm_in": "in_proj", "ssm_out": "out_proj"},
}

# every tensor of a block, in llama.cpp's file order: GGUF suffix after blk.{i}. -> HF suffix after
# backbone.layers.{i}.; ssm_in.bias / ssm_out.bias exist only with use_bias (sparsamba's engine runs them,
# llama.cpp has no slot for them)
BLOCK = {
    "mamba": {
        "attn_norm.weight": "norm.weight",
        "ssm_in.weight": "mixer.in_proj.weight",
        "ssm_in.bias": "mixer.in_proj.bias",
        "ssm_conv1d.weight": "mixer.conv1d.weight",
        "ssm_conv1d.bias": "mixer.conv1d.bias",
        "ssm_x.weight": "mixer.x_proj.weight",
        "ssm_dt.weight": "mixer.dt_proj.weight",
        "ssm_dt.bias": "mixer.dt_proj.bias",
        "ssm_a": "mixer.A_log",
        "ssm_d": "mixer.D",
        "ssm_out.weight": "mixer.out_proj.weight",
        "ssm_out.bias": "mixer.out_proj.bias",
    },
    "mamba2": {
        "attn_norm.weight": "norm.weight",
        "ssm_in.weight": "mixer.in_proj.weight",
        "ssm_in.bias": "mixer.in_proj.bias",
        "ssm_conv1d.weight": "mixer.conv1d.weight",
        "ssm_conv1d.bias": "mixer.conv1d.bias",
        "ssm_dt.bias": "mixer.dt_bias",
        "ssm_a": "mixer.A_log",
        "ssm_d": "mixer.D",
        "ssm_norm.weight": "mixer.norm.weight",
        "ssm_out.weight": "mixer.out_proj.weight",
        "ssm_out.bias": "mixer.out_proj.bias",
    },
}
OPTIONAL = ("ssm_in.bias", "ssm_out.bias")  # present with use_bias only
# the matrices, stored in the requested dtype; every other tensor stays F32 (ggml's ssm ops read F32)
MATRICES = {"token_embd.weight", "output.weight", *(f"{k}.weight" for k in LINEARS["mamba"])}

_BLK, _HF = re.compile(r"blk\.(\d+)\.(.+)"), re.compile(r"backbone\.layers\.(\d+)\.(.+)")


def hf_name(gguf_name: str, arch: str) -> str:
    """``blk.3.ssm_a`` -> ``backbone.layers.3.mixer.A_log`` (KeyError for a name the map lacks)."""
    m = _BLK.fullmatch(gguf_name)
    return f"backbone.layers.{m[1]}.{BLOCK[arch][m[2]]}" if m else GLOBAL[gguf_name]


def gguf_name(hf: str, arch: str) -> str:
    """``backbone.layers.3.mixer.A_log`` -> ``blk.3.ssm_a`` (KeyError for a name the map lacks)."""
    m = _HF.fullmatch(hf)
    if m is None:
        return {v: k for k, v in GLOBAL.items()}[hf]
    return f"blk.{m[1]}." + {v: k for k, v in BLOCK[arch].items()}[m[2]]


def to_gguf(suffix: str, t: Tensor, arch: str, n_groups: int = 1) -> Tensor:
    """A block tensor in HF layout -> the GGUF layout of ``suffix`` (see the table above)."""
    import torch
    if suffix == "ssm_conv1d.weight":
        return t[:, 0, :].contiguous()  # (C, 1, K) -> (C, K)
    if suffix == "ssm_a":
        A = -torch.exp(t.float())  # llama.cpp and the engine store A itself
        return A[:, None] if arch == "mamba2" else A
    if arch == "mamba2" and suffix == "ssm_d":
        return t[:, None]  # (h, 1): ne {1, h}, what llama.cpp's loader asks for
    if suffix == "ssm_norm.weight":
        return t.reshape(n_groups, -1)
    return t


def to_hf(suffix: str, t: Tensor, arch: str) -> Tensor:
    """The inverse of ``to_gguf``: A_log = log(-A), so it matches to float rounding, not bit for bit."""
    import torch
    if suffix == "ssm_conv1d.weight":
        return t[:, None, :]
    if suffix == "ssm_a":
        t = torch.log(-t)
    return t.flatten() if arch == "mamba2" and suffix in ("ssm_a", "ssm_d", "ssm_norm.weight") else t
