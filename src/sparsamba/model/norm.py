from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in fp32 (as transformers' MambaRMSNorm)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
