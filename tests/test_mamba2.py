"""Mamba-2 reference model: parity with transformers, scan forms, decode, gradients, config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sparsamba.errors import SparsambaError
from sparsamba.model.mamba2 import Mamba2Config, Mamba2LM, ssd_scan, ssd_scan_ref

TOL = 1e-4  # max |diff| / max |ref|, fp32


def small_cfg(**kw) -> Mamba2Config:
    base = {
        "vocab_size": 97,
        "hidden_size": 40,
        "expand": 2,
        "num_heads": 10,
        "head_dim": 8,
        "n_groups": 2,
        "state_size": 8,
        "num_hidden_layers": 2,
        "chunk_size": 16,
        "conv_kernel": 4,
    }
    return Mamba2Config(**{**base, **kw})


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    err = (out - ref).abs()
    rel = (err.max() / ref.abs().max()).item()
    assert rel <= tol, f"{what}: max rel err {rel:.3g} (max abs {err.max():.3g}, mean abs {err.mean():.3g})"


def perturb_vectors(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Move the 1-d parameters (norm weights, D, A_log, dt_bias, biases) off their init values, so a
    model that ignores one of them cannot pass."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn_like(p))


# ----------------------------------------------------------------------------------------------
# 1. parity with transformers' Mamba2ForCausalLM

PARITY = {
    # d=72 (not a multiple of 64), h=9 heads of 16, one group, l=21 over chunks of 8, untied
    "d72-g1-p16-N16": {
        "hidden_size": 72,
        "num_heads": 9,
        "head_dim": 16,
        "n_groups": 1,
        "state_size": 16,
        "chunk_size": 8,
        "seq": 21,
    },
    # d=40, h=10 heads of 8, two groups, l=37 over chunks of 16, tied head
    "d40-g2-p8-N8-tied": {
        "hidden_size": 40,
        "num_heads": 10,
        "head_dim": 8,
        "n_groups": 2,
        "state_size": 8,
        "chunk_size": 16,
        "seq": 37,
        "tie_word_embeddings": True,
    },
    # biases on in/out_proj, no conv bias, K=3, one chunk (l < Q), 3 layers
    "d64-g2-p16-bias-K3": {
        "hidden_size": 64,
        "num_heads": 8,
        "head_dim": 16,
        "n_groups": 2,
        "state_size": 16,
        "chunk_size": 256,
        "seq": 19,
        "use_bias": True,
        "use_conv_bias": False,
        "conv_kernel": 3,
        "num_hidden_layers": 3,
    },
    # time_step_limit active on both sides; l a multiple of Q; expand 1
    "d48-g2-p8-dtlimit": {
        "hidden_size": 48,
        "expand": 1,
        "num_heads": 6,
        "head_dim": 8,
        "n_groups": 2,
        "state_size": 8,
        "chunk_size": 8,
        "seq": 24,
        "time_step_limit": (0.05, 0.3),
    },
}


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    tf.Mamba2ForCausalLM  # noqa: B018 -- the lazy import of the modeling code takes a few seconds, once
    return tf


@pytest.mark.parametrize("name", list(PARITY))
def test_logits_match_transformers(name, transformers):
    torch.manual_seed(0)
    kw = dict(PARITY[name])
    seq = kw.pop("seq")
    cfg = small_cfg(**kw)
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg.to_hf())).eval()
    perturb_vectors(hf)
    model = Mamba2LM(cfg).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    assert (model.lm_head.weight is model.backbone.embeddings.weight) == cfg.tie_word_embeddings
    ids = torch.randint(0, cfg.vocab_size, (2, seq))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        out = model(ids)
    assert out.shape == ref.shape == (2, seq, cfg.vocab_size)
    assert_close(out, ref, name)


# ----------------------------------------------------------------------------------------------
# 2. chunked scan == sequential recurrence


def scan_inputs(b=2, l=45, h=6, p=4, g=3, N=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen) - 1)
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B = torch.randn(b, l, g, N, generator=gen)
    C = torch.randn(b, l, g, N, generator=gen)
    D = torch.randn(h, generator=gen)
    S0 = torch.randn(b, h, p, N, generator=gen)
    return x, dt, A, B, C, D, S0


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_ssd_scan_matches_ref(with_state, chunk):
    x, dt, A, B, C, D, S0 = scan_inputs()
    S0 = S0 if with_state else None
    y_ref, S_ref = ssd_scan_ref(x, dt, A, B, C, D, S0)
    y, S = ssd_scan(x, dt, A, B, C, D, S0, chunk=chunk)
    assert y.shape == y_ref.shape and S.shape == S_ref.shape
    assert_close(y, y_ref, f"y, chunk={chunk}")
    assert_close(S, S_ref, f"final state, chunk={chunk}")


def test_ssd_scan_grads_match_ref():
    inputs = [t.double().requires_grad_() for t in scan_inputs(l=20)]
    ref = ssd_scan_ref(*inputs)
    g_ref = torch.autograd.grad(ref[0].square().sum() + ref[1].sum(), inputs)
    out = ssd_scan(*inputs, chunk=8)
    g = torch.autograd.grad(out[0].square().sum() + out[1].sum(), inputs)
    for name, a, b in zip(["x", "dt", "A", "B", "C", "D", "S0"], g, g_ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, f"grad {name}", tol=1e-10)


def test_ssd_scan_strong_decay_is_finite():
    """Long chunks of strong decay: exp() must only ever see non-positive numbers."""
    x, dt, A, B, C, D, S0 = scan_inputs(l=64)
    dt = dt * 0 + 30.0  # Δ A down to about -60 a step, -3800 over a chunk
    y_ref, S_ref = ssd_scan_ref(x, dt, A, B, C, D, S0)
    y, S = ssd_scan(x, dt, A, B, C, D, S0, chunk=64)
    assert_close(S, S_ref, "final state, strong decay")
    assert torch.isfinite(y).all() and torch.isfinite(S).all()
    assert_close(y, y_ref, "y, strong decay")


# ----------------------------------------------------------------------------------------------
# 3. decode: step == forward, and forward with a carried state == one forward


# transformers' own cached decode (mamba2_selective_state_update) ignores time_step_limit, so with an
# active limit its decode drifts from its forward (max rel err ~2.6e-2 on the "d48-g2-p8-dtlimit" model);
# ours clamps Δ in both paths, and its step matches transformers' forward to ~1e-6 there.
@pytest.mark.parametrize(
    "kw",
    [{}, {"time_step_limit": (0.05, 0.3), "n_groups": 1, "conv_kernel": 2}, {"rms_norm": False}],
)
def test_step_decode_matches_forward(kw):
    torch.manual_seed(0)
    cfg = small_cfg(chunk_size=8, **kw)
    model = Mamba2LM(cfg).eval()
    perturb_vectors(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(2)
        steps = []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    assert_close(torch.stack(steps, 1), full, "step decode vs forward")


@pytest.mark.parametrize("split", [1, 2, 8, 13])
def test_forward_with_state_continues(split):
    torch.manual_seed(0)
    cfg = small_cfg(chunk_size=8)
    model = Mamba2LM(cfg).eval()
    perturb_vectors(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    with torch.no_grad():
        full, full_state = model(ids, return_state=True)
        head, state = model(ids[:, :split], return_state=True)
        tail, tail_state = model(ids[:, split:], state=state, return_state=True)
        nxt_full, _ = model.step(ids[:, 0], full_state)
        nxt, _ = model.step(ids[:, 0], tail_state)
    assert_close(torch.cat([head, tail], 1), full, f"prefix {split} + rest vs full")
    assert_close(nxt, nxt_full, "step after the split forward")


# ----------------------------------------------------------------------------------------------
# 4. gradients


def test_backward_gives_finite_grads():
    torch.manual_seed(0)
    cfg = small_cfg(chunk_size=8, tie_word_embeddings=True)
    model = Mamba2LM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------
# config


def test_config_roundtrip_and_hf(transformers):
    cfg = small_cfg(time_step_limit=(0.0, math.inf))
    d = {**cfg.to_hf(), "time_step_rank": 3, "rescale_prenorm_residual": False}
    assert d["architectures"] == ["Mamba2ForCausalLM"] and d["intermediate_size"] == 80
    back = Mamba2Config.from_hf(d)
    assert dataclasses.replace(back, extra={}) == cfg and back.extra == {
        "time_step_rank": 3,
        "rescale_prenorm_residual": False,
    }
    assert Mamba2Config.from_hf({**d, "eos_token_id": [5, 6]}).eos_token_id == 5
    hf = transformers.Mamba2Config(**d)
    for k in ("num_heads", "head_dim", "n_groups", "state_size", "chunk_size", "hidden_size", "expand"):
        assert getattr(hf, k) == getattr(cfg, k), k
    assert tuple(hf.time_step_limit) == cfg.time_step_limit


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_heads": 9}, "num_heads \\* head_dim"),
        ({"num_heads": 20, "head_dim": 4, "n_groups": 3}, "multiple of n_groups"),
        ({"intermediate_size": 96}, "intermediate_size"),
        ({"time_step_limit": [0.5, 0.1]}, "time_step_limit"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"norm_before_gate": True}, "norm_before_gate"),
    ],
)
def test_config_rejects_inconsistent(bad, match):
    with pytest.raises(SparsambaError, match=match):
        Mamba2Config.from_hf({**small_cfg().to_hf(), **bad})
