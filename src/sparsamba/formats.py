"""The storage dtypes of weight matrices: one table that the CLI, the exporter, the compiler, the
verifier, the size tables, the profiler and the engine all read.

    name   ggml type   bytes   llama.cpp file type   verifier bound vs the fp32 source
    f32    0 (F32)     4       0 (ALL_F32)           1e-5
    f16    1 (F16)     2       1 (MOSTLY_F16)        1e-2
    int8   24 (I8)     1       -                     1e-1   (+ an fp32 scale per row)

The ggml type is what a GGUF stores for the values and what the engine reports (``sb_info.dtype``).
Torch-free (the engine imports it): ``Dtype.torch`` imports torch when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SparsambaError


@dataclass(frozen=True)
class Dtype:
    name: str  # "f32" | "f16" | "int8": the storage format suffix (c4n2_f16)
    ggml_type: int  # GGMLQuantizationType of the stored values; the engine's dtype code
    value_bytes: int  # bytes per stored value (int8's per-row scales not counted)
    numpy: np.dtype
    torch_name: str  # attribute of torch: float32, float16, int8
    # max |plan - source| / max |source| over the logits that the compile verifier allows. f32 differs
    # by float rounding only; f16 rounds every weight to 11 bits (2^-11 ≈ 5e-4 relative), int8 to 1/254
    # of the row's largest weight, both compounded over the blocks.
    tolerance: float
    llama_ftype: int | None  # gguf.LlamaFileType of a dense llama.cpp GGUF; None: llama.cpp cannot run it
    scaled: bool  # values carry an fp32 scale per row (w = q · scale)

    @property
    def torch(self):
        import torch

        return getattr(torch, self.torch_name)


F32 = Dtype("f32", 0, 4, np.dtype(np.float32), "float32", 1e-5, 0, False)
F16 = Dtype("f16", 1, 2, np.dtype(np.float16), "float16", 1e-2, 1, False)
INT8 = Dtype("int8", 24, 1, np.dtype(np.int8), "int8", 1e-1, None, True)

DTYPES = {d.name: d for d in (F32, F16, INT8)}
PACKED = tuple(DTYPES)  # what the compiler, the engine and the profiler take
LLAMACPP = tuple(n for n, d in DTYPES.items() if d.llama_ftype is not None)  # what export-gguf writes
F16_MAX = float(np.finfo(np.float16).max)


def get(name: str | None, allowed: tuple[str, ...] = PACKED) -> Dtype:
    """The Dtype called ``name`` (None: the fp32 of a plan not packed yet), refusing one not in ``allowed``."""
    if name is None:
        return F32
    if name not in allowed:
        raise SparsambaError(f"dtype {name!r} is not supported; use one of {', '.join(allowed)}")
    return DTYPES[name]


def by_ggml_type(code: int) -> str:
    """The name of a ggml type id, or the id as text when no dtype has it."""
    return next((d.name for d in DTYPES.values() if d.ggml_type == code), str(code))
