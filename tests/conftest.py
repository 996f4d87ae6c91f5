import pytest
import torch

torch.set_flush_denormal(True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a-b| / max |b|, mean |a-b|): the figures every parity assertion reports."""
    d = (a.float() - b.float()).abs()
    return (d.max() / b.float().abs().max()).item(), d.mean().item()


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
    from sparsamba.train import _tokenizer_config, train_tokenizer

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
