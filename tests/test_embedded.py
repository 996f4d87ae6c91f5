"""The embedded default model: it loads everywhere it should, it has learned its text, and decode
agrees with the full forward on it."""

import pytest
import torch
from conftest import rel_err

from sparsamba import assets, load_model, load_tokenizer
from sparsamba.eval.data import eval_windows, read_text, tokenize
from sparsamba.eval.generate import generate
from sparsamba.eval.perplexity import perplexity, unigram_perplexity


@pytest.fixture(scope="module")
def embedded():
    return load_model(assets.DEFAULT_MODEL), load_tokenizer(assets.DEFAULT_MODEL)


def test_beats_unigram_by_far(embedded):
    model, tok = embedded
    held = eval_windows(tokenize(read_text(assets.HELDOUT), tok), 128, max_windows=8)
    calib = tokenize(read_text(assets.CALIB), tok)
    ppl = perplexity(model, held, progress=False).perplexity
    assert ppl < unigram_perplexity(calib, held, tok.get_vocab_size()) / 4, ppl


@torch.no_grad()
def test_greedy_decode_equals_full_forward_argmax(embedded):
    model, tok = embedded
    prompt = tok.encode("And God said").ids
    out = generate(model, prompt, 12)
    ids = list(prompt)
    for _ in range(12):  # recompute from scratch every token: no state carried
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


@torch.no_grad()
def test_transformers_loads_it_unchanged(embedded):
    from transformers import AutoTokenizer, MambaForCausalLM

    model, tok = embedded
    hf = MambaForCausalLM.from_pretrained(assets.DEFAULT_MODEL).eval()
    hf_tok = AutoTokenizer.from_pretrained(assets.DEFAULT_MODEL)
    text = "In the beginning God created the heaven and the earth."
    ids = tok.encode(text).ids
    assert hf_tok(text)["input_ids"] == ids
    x = torch.tensor([ids])
    assert rel_err(model(x), hf(x).logits)[0] <= 1e-4
