"""Perplexity over held-out text, the protocol of SparseGPT / Wanda: the text as one token stream,
cut into non-overlapping windows of ``seqlen``, mean next-token NLL over every predicted position,
perplexity = exp(mean NLL)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens (windows × (seqlen − 1))
    windows: int
    seqlen: int
    seconds: float


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """windows: (n, seqlen) token ids -> perplexity of ``model`` (anything mapping (b, l) ids to
    (b, l, V) logits)."""
    from ..progress import progress as progress_bar

    t0 = time.time()
    total, count = 0.0, 0
    bar = progress_bar(total=len(windows), desc="perplexity", unit="windows", enabled=progress, leave=False)
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        logits = model(w)[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
        bar.update(len(w))
    bar.close()
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(windows), windows.shape[1], time.time() - t0)


def unigram_perplexity(train_tokens: torch.Tensor, eval_windows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of a unigram model (add-one smoothed token frequencies of ``train_tokens``) on the
    same predicted positions as ``perplexity``: the floor that a language model must beat."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = eval_windows[:, 1:].flatten()
    return math.exp(-logp[targets].mean().item())
