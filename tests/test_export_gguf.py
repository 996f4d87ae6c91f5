"""export-gguf: the embedded Mamba-1 and a random Mamba-2 written as llama.cpp GGUFs and read back with
gguf.GGUFReader: metadata, names, shapes (ggml ne = numpy shape reversed), dtypes, values, tokenizer,
atomic writing and clear errors. (Whether llama.cpp itself loads the files is not checked here.)"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import rel_err

from sparsamba import assets
from sparsamba.errors import SparsambaError
from sparsamba.export.llamacpp import export_gguf, read_gguf_dense
from sparsamba.model.hf import build_model, load_model, load_state, save_model
from sparsamba.model.mamba1 import Mamba1Config
from sparsamba.model.mamba2 import Mamba2Config, Mamba2LM

TOK = assets.DEFAULT_MODEL / "tokenizer.json"
F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
# GGUF name -> True when it is a matrix (takes the requested dtype); everything else stays F32
M1_LAYER = {
    "attn_norm.weight": False,
    "ssm_in.weight": True,
    "ssm_conv1d.weight": False,
    "ssm_conv1d.bias": False,
    "ssm_x.weight": True,
    "ssm_dt.weight": True,
    "ssm_dt.bias": False,
    "ssm_a": False,
    "ssm_d": False,
    "ssm_out.weight": True,
}
M2_LAYER = {
    "attn_norm.weight": False,
    "ssm_in.weight": True,
    "ssm_conv1d.weight": False,
    "ssm_conv1d.bias": False,
    "ssm_dt.bias": False,
    "ssm_a": False,
    "ssm_d": False,
    "ssm_norm.weight": False,
    "ssm_out.weight": True,
}


def tokenizer_vocab() -> list[str]:
    tj = json.loads(TOK.read_text())
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in tj["added_tokens"]})
    return [by_id[i] for i in range(len(by_id))]


@pytest.fixture(scope="module")
def mamba2_dir(tmp_path_factory):
    """A random untied Mamba-2 with the embedded tokenizer and 4 embedding rows more than it has tokens."""
    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=4100,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        n_groups=2,
        head_dim=8,
        num_heads=8,
        chunk_size=16,
    )
    m = Mamba2LM(cfg)
    with torch.no_grad():  # move the 1-d parameters off their init values so a mix-up shows
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return save_model(m, tmp_path_factory.mktemp("m2") / "mamba2", tokenizer_dir=assets.DEFAULT_MODEL)


def _fields(r: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _check_file(path, model, layer_map: dict[str, bool], dtype: str) -> gguf.GGUFReader:
    """Names, ne, dtypes and values of every tensor against the torch model's state dict."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    expect = {"token_embd.weight": True, "output_norm.weight": False}
    if not cfg.tie_word_embeddings:
        expect["output.weight"] = True
    expect.update({f"blk.{i}.{k}": v for i in range(cfg.num_hidden_layers) for k, v in layer_map.items()})
    assert set(t) == set(expect)
    for name, is_matrix in expect.items():
        x = t[name]
        assert list(x.shape) == list(reversed(x.data.shape)), name  # ne is the numpy shape reversed
        want = F16 if is_matrix and dtype == "f16" else F32
        assert x.tensor_type == want, f"{name}: {x.tensor_type.name}, expected {want.name}"

    def same(name: str, ref: torch.Tensor) -> None:
        got = torch.from_numpy(np.array(t[name].data)).float()
        ref = ref.float()
        assert tuple(got.shape) == tuple(ref.shape), name
        if t[name].tensor_type == F32:
            assert torch.equal(got, ref), name
        else:  # fp16 rounding: half an ulp, 2**-11 relative (plus subnormals near zero)
            assert torch.allclose(got, ref, rtol=2**-11, atol=2**-24), name

    same("token_embd.weight", sd["backbone.embeddings.weight"])
    same("output_norm.weight", sd["backbone.norm_f.weight"])
    if not cfg.tie_word_embeddings:
        same("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        b, m = f"blk.{i}.", f"backbone.layers.{i}.mixer."
        A = -torch.exp(sd[m + "A_log"])
        same(b + "attn_norm.weight", sd[f"backbone.layers.{i}.norm.weight"])
        same(b + "ssm_in.weight", sd[m + "in_proj.weight"])
        same(b + "ssm_conv1d.weight", sd[m + "conv1d.weight"].squeeze(1))
        same(b + "ssm_conv1d.bias", sd[m + "conv1d.bias"])
        same(b + "ssm_out.weight", sd[m + "out_proj.weight"])
        if cfg.model_type == "mamba":
            same(b + "ssm_x.weight", sd[m + "x_proj.weight"])
            same(b + "ssm_dt.weight", sd[m + "dt_proj.weight"])
            same(b + "ssm_dt.bias", sd[m + "dt_proj.bias"])
            same(b + "ssm_a", A)  # (di, N)
            same(b + "ssm_d", sd[m + "D"])
        else:
            h, g, di = cfg.num_heads, cfg.n_groups, cfg.intermediate_size
            assert list(t[b + "ssm_a"].shape) == [1, h] and list(t[b + "ssm_d"].shape) == [1, h]
            assert list(t[b + "ssm_norm.weight"].shape) == [di // g, g]
            same(b + "ssm_dt.bias", sd[m + "dt_bias"])
            same(b + "ssm_a", A[:, None])
            same(b + "ssm_d", sd[m + "D"][:, None])
            same(b + "ssm_norm.weight", sd[m + "norm.weight"].reshape(g, di // g))
    return r


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_embedded_mamba1(tmp_path, dtype):
    out = export_gguf(assets.DEFAULT_MODEL, tmp_path / "m1.gguf", dtype=dtype)
    assert out == tmp_path / "m1.gguf" and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m1.gguf"]  # no temporary left behind
    model = load_model(assets.DEFAULT_MODEL)
    r = _check_file(out, model, M1_LAYER, dtype)
    f = _fields(r)
    assert {k: v for k, v in f.items() if not k.startswith("tokenizer.ggml.")} == {
        "general.architecture": "mamba",
        "general.type": "model",
        "general.name": "kjv-mamba-tiny",
        "mamba.context_length": 2**20,
        "mamba.embedding_length": 128,
        "mamba.feed_forward_length": 0,
        "mamba.attention.head_count": 0,
        "mamba.block_count": 4,
        "mamba.ssm.conv_kernel": 4,
        "mamba.ssm.inner_size": 256,
        "mamba.ssm.state_size": 16,
        "mamba.ssm.time_step_rank": 8,
        "mamba.ssm.dt_b_c_rms": False,
        "mamba.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
        "general.file_type": 0 if dtype == "f32" else 1,
        "general.quantization_version": 2,
    }
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tokenizer_vocab()
    assert len(vocab) == 4096 and f["tokenizer.ggml.tokens"] == vocab
    assert f["tokenizer.ggml.token_type"] == [3] + [1] * 4095  # <|endoftext|> is a control token
    merges = json.loads(TOK.read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (0, 0)
    assert f["tokenizer.ggml.padding_token_id"] == 0
    assert f["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_random_mamba2(mamba2_dir, tmp_path, dtype):
    out = export_gguf(mamba2_dir, tmp_path / "m2.gguf", dtype=dtype)
    model = load_model(mamba2_dir)
    r = _check_file(out, model, M2_LAYER, dtype)
    f = _fields(r)
    assert f["general.architecture"] == "mamba2"
    assert f["mamba2.embedding_length"] == 32 and f["mamba2.block_count"] == 2
    assert f["mamba2.ssm.inner_size"] == 64 and f["mamba2.ssm.state_size"] == 8
    assert f["mamba2.ssm.time_step_rank"] == 8  # llama.cpp reads the head count here
    assert f["mamba2.ssm.group_count"] == 2 and f["mamba2.ssm.conv_kernel"] == 4
    assert "mamba2.ssm.dt_b_c_rms" not in f
    assert f["general.file_type"] == (0 if dtype == "f32" else 1)
    toks, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(toks) == len(types) == 4100  # one token per embedding row
    assert toks[:4096] == tokenizer_vocab()
    assert toks[4096:] == [f"[PAD{i}]" for i in range(4096, 4100)] and types[4096:] == [5] * 4
    ids = (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"])
    assert ids + (f["tokenizer.ggml.padding_token_id"],) == (0, 2, 1)


@torch.no_grad()
@pytest.mark.parametrize("which", ["mamba", "mamba2"])
def test_read_back_gives_the_same_model(mamba2_dir, tmp_path, which):
    src = assets.DEFAULT_MODEL if which == "mamba" else mamba2_dir
    cfg_d, sd = read_gguf_dense(export_gguf(src, tmp_path / "x.gguf"))
    ref = load_model(src)
    cls = Mamba1Config if which == "mamba" else Mamba2Config
    cfg = cls.from_hf(cfg_d)
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel"):
        assert getattr(cfg, k) == getattr(ref.config, k), k
    assert cfg.layer_norm_epsilon == ref.config.layer_norm_epsilon
    assert cfg.tie_word_embeddings == ref.config.tie_word_embeddings
    back = build_model(cfg)
    load_state(back, sd, tmp_path)
    back.eval()
    ids = torch.randint(0, 4096, (1, 24))
    assert rel_err(back(ids), ref(ids))[0] <= 1e-5  # A_log = log(-A) differs by float rounding only


def test_existing_output_refused_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(SparsambaError, match="already exists"):
        export_gguf(assets.DEFAULT_MODEL, out)
    assert out.read_bytes() == b"old"

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(SparsambaError, match="cannot write"):
        export_gguf(assets.DEFAULT_MODEL, out, overwrite=True)
    assert out.read_bytes() == b"old"  # the old file untouched
    with pytest.raises(SparsambaError, match="cannot write"):
        export_gguf(assets.DEFAULT_MODEL, tmp_path / "new.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary, no half file
    monkeypatch.undo()
    export_gguf(assets.DEFAULT_MODEL, out, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "mamba"


def _copy_model(tmp_path, edit_config=None, tokenizer: bool = True):
    d = tmp_path / "model"
    shutil.copytree(assets.DEFAULT_MODEL, d)
    if not tokenizer:
        (d / "tokenizer.json").unlink()
    if edit_config:
        c = json.loads((d / "config.json").read_text())
        edit_config(c)
        (d / "config.json").write_text(json.dumps(c))
    return d


def test_bad_inputs(tmp_path):
    out = tmp_path / "o.gguf"
    with pytest.raises(SparsambaError, match="dtype 'q8_0' is not supported"):
        export_gguf(assets.DEFAULT_MODEL, out, dtype="q8_0")
    with pytest.raises(SparsambaError, match="no tokenizer.json"):
        export_gguf(_copy_model(tmp_path, tokenizer=False), out)
    shutil.rmtree(tmp_path / "model")
    with pytest.raises(SparsambaError, match="no such directory"):
        export_gguf(tmp_path / "missing", out)
    with pytest.raises(SparsambaError, match="is a directory"):
        export_gguf(assets.DEFAULT_MODEL, tmp_path)
    assert not out.exists()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(expand=3, intermediate_size=384), "supports expand = 2 only"),
        (lambda c: c.update(use_bias=True), "no slot for them"),
        (lambda c: c.update(vocab_size=4000), "has token id 4095 but the model has 4000"),
    ],
)
def test_model_llamacpp_cannot_run_is_refused(tmp_path, edit, match):
    with pytest.raises(SparsambaError, match=match):
        export_gguf(_copy_model(tmp_path, edit), tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_non_byte_level_tokenizer_refused(tmp_path):
    d = _copy_model(tmp_path)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(SparsambaError, match="byte-level BPE tokenizers only"):
        export_gguf(d, tmp_path / "o.gguf")


def test_read_gguf_dense_bad_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf at all")
    with pytest.raises(SparsambaError, match="cannot read as GGUF"):
        read_gguf_dense(p)


def test_cli(tmp_path, capsys):
    from sparsamba.cli import main

    out = tmp_path / "e.gguf"
    assert main(["export-gguf", "-o", str(out), "--dtype", "f16"]) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "42 tensors" in text and "MB" in text
    assert main(["export-gguf", "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export-gguf", "-o", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(rms_norm=False), "always applies it"),
        (lambda c: c.update(time_step_limit=[0.0, 0.1]), "never clamps it"),
    ],
)
def test_mamba2_llamacpp_cannot_run_is_refused(mamba2_dir, tmp_path, edit, match):
    d = tmp_path / "m"
    shutil.copytree(mamba2_dir, d)
    c = json.loads((d / "config.json").read_text())
    edit(c)
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(SparsambaError, match=match):
        export_gguf(d, tmp_path / "o.gguf")


def test_pruned_zeros_stay_exact_zeros(tmp_path):
    """A pruned model is dense with exact zeros; both dtypes keep every zero (and nothing else) zero."""
    m = load_model(assets.DEFAULT_MODEL)
    w = m.backbone.layers[0].mixer.in_proj.weight
    with torch.no_grad():
        w.view(-1, 4)[:, :2] = 0.0  # 2 of every 4 consecutive weights, as a 2:4 pattern
    d = save_model(m, tmp_path / "pruned", tokenizer_dir=assets.DEFAULT_MODEL)
    for dtype in ("f32", "f16"):
        r = gguf.GGUFReader(export_gguf(d, tmp_path / f"{dtype}.gguf", dtype=dtype))
        got = next(x for x in r.tensors if x.name == "blk.0.ssm_in.weight").data
        assert np.array_equal(got == 0, (w == 0).numpy()), dtype
