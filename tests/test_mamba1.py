"""The torch reference of Mamba-1 against transformers, and its own fast paths against each other."""

import pytest
import torch
from conftest import rel_err
from transformers import MambaConfig, MambaForCausalLM

from sparsamba.model.mamba1 import Mamba1Config, Mamba1LM, selective_scan, selective_scan_ref

CONFIGS = [
    # odd shapes on purpose: d_model not a multiple of 64, dt_rank not a multiple of 4
    dict(vocab_size=101, hidden_size=72, state_size=8, num_hidden_layers=3, time_step_rank=7),
    dict(
        vocab_size=64,
        hidden_size=40,
        state_size=16,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        use_bias=True,
    ),
    dict(vocab_size=50, hidden_size=96, state_size=16, num_hidden_layers=2, conv_kernel=3, expand=3),
    dict(
        vocab_size=33,
        hidden_size=24,
        state_size=4,
        num_hidden_layers=1,
        use_conv_bias=False,
        time_step_rank=3,
    ),
]


def _pair(hf_kw: dict, seed: int = 0) -> tuple[MambaForCausalLM, Mamba1LM]:
    torch.manual_seed(seed)
    hf = MambaForCausalLM(MambaConfig(**hf_kw)).eval()
    ours = Mamba1LM(Mamba1Config.from_hf(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=not hf_kw.get("tie_word_embeddings", True) or False)
    return hf, ours


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: f"d{kw['hidden_size']}_N{kw['state_size']}")
@torch.no_grad()
def test_logits_match_transformers(kw):
    hf, ours = _pair(kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 45))
    ref = hf(ids).logits
    got = ours(ids)
    mx, mean = rel_err(got, ref)
    assert mx <= 1e-4, f"max rel err {mx:.2e}, mean abs err {mean:.2e}"


@torch.no_grad()
def test_long_sequence_crosses_scan_chunks():
    hf, ours = _pair(CONFIGS[0], seed=1)
    ids = torch.randint(0, 101, (1, 300))  # > the 256-step chunk of selective_scan
    mx, mean = rel_err(ours(ids), hf(ids).logits)
    assert mx <= 1e-4, f"max rel err {mx:.2e}, mean abs err {mean:.2e}"


@pytest.mark.parametrize("with_h0", [False, True])
def test_selective_scan_matches_sequential_reference(with_h0):
    torch.manual_seed(0)
    b, l, di, N = 2, 70, 12, 5
    u, z = torch.randn(b, l, di), torch.randn(b, l, di)
    delta = torch.nn.functional.softplus(z)
    A = -torch.rand(di, N) * 4
    B, C, D = torch.randn(b, l, N), torch.randn(b, l, N), torch.randn(di)
    h0 = torch.randn(b, di, N) if with_h0 else None
    y_ref, h_ref = selective_scan_ref(u, delta, A, B, C, D, h0)
    y, h = selective_scan(u, delta, A, B, C, D, h0, chunk=16)
    assert rel_err(y, y_ref)[0] <= 1e-5 and rel_err(h, h_ref)[0] <= 1e-5


@torch.no_grad()
def test_step_decode_equals_full_forward():
    _, ours = _pair(CONFIGS[0], seed=2)
    ids = torch.randint(0, 101, (2, 40))
    full = ours(ids)
    state = ours.init_state(2)
    steps = []
    for t in range(ids.shape[1]):
        logits, state = ours.step(ids[:, t], state)
        steps.append(logits)
    mx, mean = rel_err(torch.stack(steps, 1), full)
    assert mx <= 1e-5, f"max rel err {mx:.2e}, mean abs err {mean:.2e}"


@torch.no_grad()
def test_prefill_state_continues_forward():
    _, ours = _pair(CONFIGS[1], seed=3)
    ids = torch.randint(0, 64, (2, 33))
    full = ours(ids)
    head, state = ours(ids[:, :20], return_state=True)
    tail = ours(ids[:, 20:], state)
    mx, _ = rel_err(torch.cat([head, tail], 1), full)
    assert mx <= 1e-5
    # and decode continues from a prefilled state
    nxt, _ = ours.step(ids[:, 20], state)
    assert rel_err(nxt, full[:, 20])[0] <= 1e-5


def test_gradients_flow():
    _, ours = _pair(CONFIGS[0])
    ours.train()
    ids = torch.randint(0, 101, (2, 20))
    loss = torch.nn.functional.cross_entropy(ours(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ours.backbone.layers[0].mixer.A_log.grad.abs().sum() > 0
