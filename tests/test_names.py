"""The HF <-> GGUF name map (sparsamba.model.names): every tensor of both architectures round-trips."""

import pytest
import torch

from sparsamba.model import names
from sparsamba.model.mamba1 import Mamba1Config, Mamba1LM
from sparsamba.model.mamba2 import Mamba2Config, Mamba2LM
from sparsamba.prune.calibrate import prunable_layers

MODELS = {
    "mamba": lambda: Mamba1LM(
        Mamba1Config(vocab_size=31, hidden_size=8, num_hidden_layers=2, state_size=1, use_bias=True)
    ),
    "mamba2": lambda: Mamba2LM(
        Mamba2Config(
            vocab_size=31, hidden_size=16, state_size=4, num_hidden_layers=2, n_groups=2, head_dim=8,
            num_heads=4, chunk_size=8, tie_word_embeddings=False,
        )
    ),
}


@pytest.mark.parametrize("arch", MODELS)
def test_every_tensor_round_trips(arch):
    torch.manual_seed(0)
    model = MODELS[arch]()
    g = getattr(model.config, "n_groups", 1)
    for hf, t in model.state_dict().items():
        gg = names.gguf_name(hf, arch)
        assert names.hf_name(gg, arch) == hf
        suffix = gg.split(".", 2)[2] if gg.startswith("blk.") else gg
        back = names.to_hf(suffix, names.to_gguf(suffix, t, arch, g), arch)
        assert back.shape == t.shape and torch.allclose(back, t, rtol=1e-6), hf
    assert names.to_gguf("ssm_a", torch.zeros(3, 1), "mamba").shape == (3, 1)  # N = 1 stays 2-d
    assert names.to_gguf("ssm_a", torch.zeros(3), "mamba2").shape == (3, 1)  # ne {1, h}
    assert names.to_gguf("ssm_norm.weight", torch.zeros(12), arch, 2).shape == (2, 6)


@pytest.mark.parametrize("arch", MODELS)
def test_linears_are_the_prunable_layers(arch):
    model = MODELS[arch]()
    got = [name.rsplit(".", 1)[1] for name, _ in prunable_layers(model)[0]]
    assert got == list(names.LINEARS[arch].values())
    for k in names.LINEARS[arch]:
        assert f"{k}.weight" in names.BLOCK[arch] and f"{k}.weight" in names.MATRICES
