"""Token generation with the reference model: one forward over the prompt (prefill), then ``step``
per new token with the recurrent state carried (decode)."""

from __future__ import annotations

import torch

from ..errors import SparsambaError


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> list[int]:
    """New token ids after ``prompt_ids``: greedy when ``temperature`` is 0, else sampled from
    softmax(logits / temperature), restricted to the ``top_k`` most likely when top_k > 0."""
    from ..runtime.engine import check_sampling  # one check of the settings for both generators

    if not prompt_ids:
        raise SparsambaError("the prompt is empty; give at least one token of text")
    check_sampling(max_new_tokens, temperature, top_k)
    vocab = model.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise SparsambaError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    g = torch.Generator().manual_seed(seed)
    recurrent = hasattr(model, "step")  # our Mamba references; others (transformers) re-run the prefix
    ids = list(prompt_ids)
    if recurrent:
        logits, state = model(torch.tensor([ids]), return_state=True)
        logits = logits[:, -1]
    else:
        logits = model(torch.tensor([ids]))[:, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        if temperature <= 0:
            tok = int(logits[0].argmax())
        else:
            lg = logits[0].float() / temperature
            if top_k > 0:
                kth = torch.topk(lg, min(top_k, lg.numel())).values[-1]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            tok = int(torch.multinomial(torch.softmax(lg, -1), 1, generator=g))
        out.append(tok)
        if eos_token_id is not None and tok == eos_token_id:
            break
        ids.append(tok)
        if recurrent:
            logits, state = model.step(torch.tensor([tok]), state)
        else:
            logits = model(torch.tensor([ids]))[:, -1]
    return out
