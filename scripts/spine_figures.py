"""The embedded model's figures for the spine: held-out perplexity of the dense model, of a unigram
model (the floor to beat), and of the model with 50% of every prunable weight matrix removed by
magnitude (per output row, unstructured) — the gap that pruning methods compete in.

    python scripts/spine_figures.py [--seqlen 256]
"""

from __future__ import annotations

import argparse
import copy

import torch

from sparsamba import assets, load_model, load_tokenizer
from sparsamba.eval.data import eval_windows, read_text, tokenize
from sparsamba.eval.perplexity import perplexity, unigram_perplexity

PRUNABLE = ("in_proj", "x_proj", "dt_proj", "out_proj")


@torch.no_grad()
def magnitude_prune_rows(model, sparsity: float):
    """Zero the smallest |w| of each row of every prunable projection (a baseline, not the pruner)."""
    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if name.split(".")[-1] in PRUNABLE:
            W = mod.weight
            k = int(W.shape[1] * sparsity)
            idx = W.abs().argsort(dim=1)[:, :k]
            W.scatter_(1, idx, 0.0)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=256)
    a = ap.parse_args()
    torch.set_flush_denormal(True)
    model = load_model(assets.DEFAULT_MODEL)
    tok = load_tokenizer(assets.DEFAULT_MODEL)
    held = eval_windows(tokenize(read_text(assets.HELDOUT), tok), a.seqlen)
    train = tokenize(read_text(assets.KJV_TEXT / "train.txt.gz"), tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"| model | held-out perplexity (seqlen {a.seqlen}, {held[:, 1:].numel()} tokens) |")
    print("| --- | --- |")
    print(
        f"| unigram (train-split token frequencies) | {unigram_perplexity(train, held, tok.get_vocab_size()):.2f} |"
    )
    print(
        f"| dense ({n_params / 1e6:.2f}M parameters) | {perplexity(model, held, progress=False).perplexity:.2f} |"
    )
    for s in (0.3, 0.5, 0.7):
        ppl = perplexity(magnitude_prune_rows(model, s), held, progress=False).perplexity
        print(f"| magnitude {int(s * 100)}% (per row, unstructured) | {ppl:.2f} |")


if __name__ == "__main__":
    main()
