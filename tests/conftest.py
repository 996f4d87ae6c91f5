import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_flush_denormal(True)


def rel_err(a, b) -> tuple[float, float]:
    """(max |a-b| / max |b|, mean |a-b|) of two tensors or numpy arrays (compared in fp32): the figures
    every parity assertion reports."""
    d = (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs()
    return (d.max() / torch.as_tensor(b).float().abs().max()).item(), d.mean().item()


def max_rel(a, b) -> float:
    """max |a-b| / max |b|."""
    return rel_err(a, b)[0]


@pytest.fixture
def tiny_hf_mamba(tmp_path):
    """A random transformers MambaForCausalLM written with save_pretrained: (directory, hf model)."""
    from transformers import MambaConfig, MambaForCausalLM

    def make(**kw):
        torch.manual_seed(kw.pop("seed", 0))
        cfg = dict(vocab_size=97, hidden_size=40, state_size=8, num_hidden_layers=2, time_step_rank=5)
        cfg.update(kw)
        hf = MambaForCausalLM(MambaConfig(**cfg)).eval()
        d = tmp_path / "hf-mamba"
        hf.save_pretrained(d)
        return d, hf

    return make


SAMPLE_TEXT = "\n".join(
    f"And it came to pass on day {i}, that the {w} went out into the field, and it was good."
    for i, w in enumerate(["sower", "shepherd", "king", "servant", "prophet", "people"] * 12)
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random Mamba-1 with a real byte-level BPE tokenizer, written as an HF-format directory."""
    import json

    from sparsamba.model.hf import save_model
    from sparsamba.model.mamba1 import Mamba1Config, Mamba1LM
    from sparsamba.model.train_tiny import _tokenizer_config, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(SAMPLE_TEXT, 300)
    tok_dir = root / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config()))
    torch.manual_seed(0)
    model = Mamba1LM(Mamba1Config(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2))
    (root / "text.txt").write_text(SAMPLE_TEXT)
    return save_model(model, root / "model", tokenizer_dir=tok_dir)


def quick_prune_args(model, calib, out, seqlen: int = 32) -> list[str]:
    """`sparsamba prune` arguments for a fast Wanda 2:4 run on a few short calibration windows."""
    return [
        "prune",
        str(model),
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--calib",
        str(calib),
        "--nsamples",
        "4",
        "--seqlen",
        str(seqlen),
        "-o",
        str(out),
    ]


# Random Mamba-1s with odd shapes, for the compiler and the engine
PRUNED_CONFIGS = {
    # d_inner 72 (not a multiple of 16), dt_rank 3 (< 4: one padded group), tied, biases, no conv bias
    "d24": dict(hidden_size=24, expand=3, time_step_rank=3, state_size=6, use_bias=True, use_conv_bias=False),
    # d_inner 80, dt_rank 5, untied head
    "d40": dict(hidden_size=40, expand=2, time_step_rank=5, state_size=4, tie_word_embeddings=False),
    # d_inner 54: ssm_x / ssm_out rows end in a padded group; untied, biases
    "d18": dict(
        hidden_size=18, expand=3, time_step_rank=2, state_size=5, tie_word_embeddings=False, use_bias=True
    ),
}


EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "sparsamba" / "assets" / "kjv-mamba-tiny"


def compiled_models(root, seed: int) -> dict:
    """The engine tests' models: each of PRUNED_CONFIGS and the embedded model, with random C_4^n rows,
    compiled to f32 / f16 / int8 under ``root``: {(name, dtype): (packed file, source directory)}."""
    from sparsamba.compile import compile_model

    dirs = {
        k: random_pruned(root / k, seed=seed + i, **kw) for i, (k, kw) in enumerate(PRUNED_CONFIGS.items())
    }
    dirs["embedded-pruned"] = random_pruned(root / "emb", seed=seed + len(dirs), like=EMBEDDED)
    return {
        (name, dtype): (compile_model(d, root / f"{name}-{dtype}.gguf", dtype=dtype).path, d)
        for name, d in dirs.items()
        for dtype in ("f32", "f16", "int8")
    }


def random_pruned(out_dir, seed: int = 0, row_block: int = 1, vocab: int = 61, like=None, **cfg_kw):
    """A Mamba-1 whose prunable rows follow C_4^n with n drawn from 0..4 per row (or per block of
    ``row_block`` rows): random with ``cfg_kw`` (2 blocks), or the model in the folder ``like``."""
    from sparsamba.model.hf import load_model, save_model
    from sparsamba.model.mamba1 import Mamba1Config, Mamba1LM
    from sparsamba.prune.pattern import group_masks

    torch.manual_seed(seed)
    if like is None:
        m = Mamba1LM(Mamba1Config(vocab_size=vocab, num_hidden_layers=2, **cfg_kw))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.ndim == 1 or name.endswith(
                    "A_log"
                ):  # off their init values, so a mixed-up channel shows
                    p.add_(0.3 * torch.randn_like(p))
    else:
        m = load_model(like)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name.endswith(("in_proj", "x_proj", "dt_proj", "out_proj")):
                W = mod.weight
                out = W.shape[0]
                n = torch.randint(0, 5, (-(-out // row_block),)).repeat_interleave(row_block)[:out]
                W.mul_(group_masks(torch.randn_like(W))[n, torch.arange(out)])
    return save_model(m, out_dir, tokenizer_dir=like)


# Random Mamba-2s with odd shapes, for the compiler and the engine (tests/test_engine_mamba2.py)
MAMBA2_CONFIGS = {
    # one group, head_dim 16, N 16 (whole SIMD vectors), untied head
    "g1-p16-N16": dict(
        hidden_size=48, num_heads=6, head_dim=16, n_groups=1, state_size=16, tie_word_embeddings=False
    ),
    # three groups, head_dim 5, N 7 (SIMD tails), K 3, biases, no conv bias, both time_step_limit sides
    "g3-p5-N7-bias": dict(
        hidden_size=30,
        num_heads=12,
        head_dim=5,
        n_groups=3,
        state_size=7,
        conv_kernel=3,
        use_bias=True,
        use_conv_bias=False,
        tie_word_embeddings=True,
        time_step_limit=(0.02, 0.5),
    ),
    # expand 1, two groups, head_dim 9, N 20, upper clamp only, chunk 8 (not dividing the prompt)
    "g2-p9-N20-dtmax": dict(
        hidden_size=36,
        expand=1,
        num_heads=4,
        head_dim=9,
        n_groups=2,
        state_size=20,
        chunk_size=8,
        tie_word_embeddings=False,
        time_step_limit=(0.0, 0.08),
    ),
}


def random_mamba2(out_dir, seed: int, pruned: bool, vocab: int = 53, **kw):
    """A random Mamba-2 (2 blocks) off its init values; ``pruned``: in_proj / out_proj rows follow C_4^n
    with n drawn from 0..4 per row."""
    from sparsamba.model.hf import save_model
    from sparsamba.model.mamba2 import Mamba2Config, Mamba2LM
    from sparsamba.prune.pattern import group_masks

    torch.manual_seed(seed)
    cfg = Mamba2Config(vocab_size=vocab, num_hidden_layers=2, chunk_size=kw.pop("chunk_size", 16), **kw)
    m = Mamba2LM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:  # norm weights, D, A_log, dt_bias, biases: a mixed-up channel shows
                p.add_(0.3 * torch.randn_like(p))
        if pruned:
            for name, mod in m.named_modules():
                if name.endswith(("in_proj", "out_proj")):
                    W = mod.weight
                    n = torch.randint(0, 5, (W.shape[0],))
                    W.mul_(group_masks(torch.randn_like(W))[n, torch.arange(W.shape[0])])
    return save_model(m, out_dir)


def decode_in_subprocess(jobs: dict, threads: int) -> dict:
    """{key: (gguf path, ids)} decoded token by token with ``threads`` threads and every product split
    (SPARSAMBA_MIN_SPLIT_BYTES=0 is read once per process): {key: logits (n, vocab)}."""
    code = (
        "import sys, json, numpy as np; from sparsamba.runtime.engine import Engine\n"
        "jobs = json.loads(sys.argv[2]); out = {}\n"
        "for key, (path, ids) in jobs.items():\n"
        f"    e = Engine(path, threads={threads}); out[key] = np.stack([e.decode(t) for t in ids])\n"
        "np.savez(sys.argv[1], **out)"
    )
    out = Path(tempfile.mkdtemp()) / "logits.npz"
    env = {**os.environ, "SPARSAMBA_MIN_SPLIT_BYTES": "0"}
    args = [sys.executable, "-c", code, str(out), json.dumps({k: [str(p), i] for k, (p, i) in jobs.items()})]
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return dict(np.load(out))
