"""Loading HF-format directories: both weight namings, tied and untied heads, and every bad input
getting a clear SparsambaError."""

import json

import pytest
import torch
from conftest import rel_err
from safetensors.torch import save_file

from sparsamba import SparsambaError, load_model, save_model
from sparsamba.model.hf import resolve


@torch.no_grad()
@pytest.mark.parametrize("tied", [True, False])
def test_loads_transformers_save_pretrained(tiny_hf_mamba, tied):
    d, hf = tiny_hf_mamba(tie_word_embeddings=tied)
    m = load_model(d)
    ids = torch.randint(0, 97, (1, 12))
    assert rel_err(m(ids), hf(ids).logits)[0] <= 1e-5


@torch.no_grad()
def test_save_roundtrip_loads_in_transformers(tiny_hf_mamba, tmp_path):
    from transformers import MambaForCausalLM

    d, hf = tiny_hf_mamba()
    m = load_model(d)
    out = save_model(m, tmp_path / "copy")
    back = MambaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 97, (1, 12))
    assert rel_err(back(ids).logits, hf(ids).logits)[0] <= 1e-6
    with pytest.raises(SparsambaError, match="already exists"):
        save_model(m, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@torch.no_grad()
def test_state_spaces_checkpoint_naming(tiny_hf_mamba, tmp_path):
    """The original state-spaces/mamba-* layout: d_model / n_layer config, backbone.embedding."""
    _, hf = tiny_hf_mamba()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    d = tmp_path / "ss"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    cfg = {
        "d_model": 40,
        "n_layer": 2,
        "vocab_size": 97,
        "ssm_cfg": {"d_state": 8, "dt_rank": 5},
        "pad_vocab_size_multiple": 1,
        "tie_embeddings": True,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(d)
    ids = torch.randint(0, 97, (1, 9))
    assert rel_err(m(ids), hf(ids).logits)[0] <= 1e-5


def _model_dir(tiny_hf_mamba):
    d, _ = tiny_hf_mamba()
    return d


def test_missing_config(tiny_hf_mamba):
    d = _model_dir(tiny_hf_mamba)
    (d / "config.json").unlink()
    with pytest.raises(SparsambaError, match="no config.json"):
        load_model(d)


def test_malformed_config(tiny_hf_mamba):
    d = _model_dir(tiny_hf_mamba)
    (d / "config.json").write_text("{not json")
    with pytest.raises(SparsambaError, match="not valid JSON"):
        load_model(d)


def test_unknown_architecture(tiny_hf_mamba):
    d = _model_dir(tiny_hf_mamba)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SparsambaError, match="unknown model_type 'llama'"):
        load_model(d)


def test_truncated_safetensors(tiny_hf_mamba):
    d = _model_dir(tiny_hf_mamba)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SparsambaError, match="truncated or corrupt"):
        load_model(d)


def test_shape_disagrees_with_config(tiny_hf_mamba):
    d = _model_dir(tiny_hf_mamba)
    cfg = json.loads((d / "config.json").read_text())
    cfg["state_size"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SparsambaError, match=r"tensor \S+ has shape .* config.json implies"):
        load_model(d)


def test_missing_tensor(tiny_hf_mamba):
    d = _model_dir(tiny_hf_mamba)
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    del sd["backbone.layers.1.mixer.D"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(SparsambaError, match="missing"):
        load_model(d)


def test_pickle_with_code_is_refused(tmp_path):
    """weights_only=True: a .bin that would run code on load is rejected, never executed."""

    class Evil:
        def __reduce__(self):
            return (exec, ("import sys; sys.exit('pwned')",))

    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mamba",
                "vocab_size": 8,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "state_size": 4,
            }
        )
    )
    with pytest.raises(SparsambaError, match="cannot load as plain tensors"):
        load_model(d)


def test_missing_local_path_is_not_a_hub_id(tmp_path):
    with pytest.raises(SparsambaError, match="no such directory"):
        resolve(tmp_path / "nope" / "deeper")


def test_hub_id_without_network_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparsambaError, match="downloading it from the hub failed"):
        resolve("state-spaces/not-a-real-model-xyz")


@torch.no_grad()
def test_loads_mamba2_save_pretrained(tmp_path):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=50,
        hidden_size=40,
        state_size=8,
        num_hidden_layers=2,
        head_dim=8,
        num_heads=10,
        n_groups=2,
        chunk_size=16,
    )
    hf = Mamba2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "m2")
    m = load_model(tmp_path / "m2")
    ids = torch.randint(0, 50, (1, 21))
    assert rel_err(m(ids), hf(ids).logits)[0] <= 1e-4
    back = load_model(save_model(m, tmp_path / "m2-copy"))
    assert torch.equal(back(ids), m(ids))
