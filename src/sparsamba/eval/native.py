"""The native engine as a model for ``perplexity``: a packed GGUF scored with the same windows as the
torch reference, so a packed model's quality (f16 / int8 rounding, the int8 kernels' activation
rounding) is measured on the text rather than assumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class EngineLM:
    """(b, l) token ids -> (b, l, V) fp32 logits, each window from a fresh state (prefill, every position)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from ..runtime.engine import Engine

        self.engine = Engine(path, threads=threads)
        self.config = self.engine.info

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = [self.engine.logits(row.tolist()) for row in ids]  # logits() resets the state first
        return torch.from_numpy(np.stack(out))

    def tokenizer(self):
        return self.engine.tokenizer()

    def close(self) -> None:
        self.engine.close()
