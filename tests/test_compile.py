"""The compiler: passes that keep the function, the packed GGUF of docs/packed-format.md written and read
back exactly, the bytes table, clear errors, and `sparsamba compile`.

Models are small random Mamba-1s with odd shapes (d_inner not a multiple of 16 or of 4, dt_rank below 4
or not a multiple of 4, tied and untied heads, with and without biases) whose prunable rows follow
random C_4^n masks, n = 0..4 mixed per row (or per aligned block of 4 rows, as `prune --row-block 4`)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import PRUNED_CONFIGS, max_rel, random_pruned

from sparsamba.cli import main
from sparsamba.compile import (
    compile_model,
    fold_layouts,
    fuse,
    pack,
    plan_forward,
    plan_from_model,
    read_packed,
    reorder,
    write_packed,
)
from sparsamba.compile.packed_gguf import tensors_of
from sparsamba.compile.packed_v2 import DTYPES, matrix_bytes, unpack_matrix, up
from sparsamba.compile.plan import classify_rows, dense_rows
from sparsamba.compile.verify import check_plan, sample_ids
from sparsamba.errors import SparsambaError
from sparsamba.model.hf import load_model
from sparsamba.prune.pattern import removed_per_row

CONFIGS = PRUNED_CONFIGS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    return {k: random_pruned(root / k, seed=i, **kw) for i, (k, kw) in enumerate(CONFIGS.items())}


def reference(model_dir, ids):
    with torch.no_grad():
        return load_model(model_dir)(ids)


# ----------------------------------------------------------------------------------------------
# rows and codes


def test_classify_rows_is_exact_for_any_zeros():
    torch.manual_seed(0)
    W = torch.randn(64, 10)  # in = 10: the last group has 2 real positions and 2 of padding
    W[torch.rand_like(W) < 0.4] = 0  # zeros anywhere, no pattern
    W[3] = 0  # an all-zero row: n = 4
    n, keep = classify_rows(W)
    assert torch.equal(n, removed_per_row(W))
    G = 3
    groups = keep.view(64, G, 4)
    assert torch.equal(groups.sum(-1), (4 - n)[:, None].expand(64, G))  # exactly 4 - n kept per group
    assert not (W != 0)[~keep[:, :10]].any()  # every non-zero is kept, so the packed row is exactly W x
    # kept zeros are the lowest-index zeros of their group
    row = torch.tensor([[0.0, 0.0, 5.0, 0.0, 1.0, 2.0, 0.0, 0.0]])  # group 0 has 1 non-zero, group 1 two
    n, keep = classify_rows(row)
    assert n.item() == 2 and keep.tolist() == [[True, False, True, False, True, True, False, False]]


# ----------------------------------------------------------------------------------------------
# passes keep the function


@pytest.mark.parametrize("which", list(CONFIGS))
def test_each_pass_keeps_the_function(models, which):
    d = models[which]
    ids = sample_ids(61, batch=2, length=5)
    ref = reference(d, ids)
    p = plan_from_model(d)
    errs = {"load": max_rel(plan_forward(p, ids), ref)}
    for name, f in (("reorder", reorder), ("fold", fold_layouts), ("fuse", fuse), ("pack", lambda q: pack(q, "f32"))):
        p = f(p)
        check_plan(p, name)
        errs[name] = max_rel(plan_forward(p, ids), ref)
    assert max(errs.values()) <= 1e-5, errs
    assert p.norm_folded and all("attn_norm.weight" not in b.tensors for b in p.blocks)
    assert all(not lp.dense for b in p.blocks for lp in b.linears.values())  # every pruned layer packed
    # rows of n = 4 vanished, the others are stored once
    for b in p.blocks:
        lp = b.linears["ssm_out"]
        assert sum(len(c.rows) for c in lp.classes) == int((dense_rows(lp).abs().sum(1) > 0).sum())


def test_dense_model_stays_dense(tiny_model_dir, tmp_path):
    rep = compile_model(tiny_model_dir, tmp_path / "m.gguf", dtype="f32")
    assert rep.errors["file"] <= 1e-5
    back = read_packed(rep.path)
    assert all(lp.dense for _, lp in back.linears())
    # a dense layer is one n = 0 class: the dense bytes plus headers, row index and padding to blocks
    assert all(s.ours == matrix_bytes(s.in_features, 0, {0: s.out_features}) >= s.dense for s in rep.sizes)


def test_fold_permutes_when_blocks_of_4_share_n(tmp_path):
    d = random_pruned(tmp_path / "rb4", seed=5, row_block=4, **CONFIGS["d40"])
    ids = sample_ids(61, batch=2, length=5)
    ref = reference(d, ids)
    p = fold_layouts(reorder(plan_from_model(d)))
    di = p.dims.d_inner
    assert all(b.perm is not None and not torch.equal(b.perm, torch.arange(di)) for b in p.blocks)
    assert max_rel(plan_forward(p, ids), ref) <= 1e-5
    for b in p.blocks:
        # ssm_in's classes now write their x outputs to consecutive channels: 0, 1, 2, ... in class order
        xs = torch.cat([c.rows[c.rows < di] for c in b.linears["ssm_in"].classes])
        assert torch.equal(xs.long(), torch.arange(len(xs)))
        for c in b.linears["ssm_in"].classes:
            assert torch.equal(c.rows, c.rows.sort().values)
    # rows pruned one by one: π would break ssm_x / ssm_out's groups of 4, so it stays the identity
    q = fold_layouts(reorder(plan_from_model(random_pruned(tmp_path / "rb1", seed=5, **CONFIGS["d40"]))))
    assert all(b.perm is None for b in q.blocks)
    assert "groups of 4" in json.dumps(q.options["fold"])


# ----------------------------------------------------------------------------------------------
# the file


@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
def test_write_read_round_trips_exactly(models, tmp_path, dtype):
    d = models["d18"]
    p = pack(fuse(fold_layouts(reorder(plan_from_model(d)))), dtype)
    path = write_packed(p, tmp_path / "m.gguf")
    back = read_packed(path)
    a, b = tensors_of(p), tensors_of(back)
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert (back.dims, back.norm_folded, back.dtype, back.passes) == (p.dims, True, dtype, p.passes)
    ids = sample_ids(61)
    assert torch.equal(plan_forward(back, ids), plan_forward(p, ids))
    bound = {"f32": 1e-5, "f16": 1e-2, "int8": 1e-1}[dtype]
    assert max_rel(plan_forward(back, ids), reference(d, ids)) <= bound


def test_file_layout_follows_the_format(models, tmp_path):
    d = models["d24"]
    path = compile_model(d, tmp_path / "m.gguf", dtype="int8").path
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "sparsamba.mamba" and f["general.alignment"] == 64
    assert f["sparsamba.format_version"] == 2 and f["sparsamba.compile.dtype"] == "int8"
    assert json.loads(f["sparsamba.compile.options"])["passes"] == ["reorder", "fold", "fuse", "pack"]
    K = "sparsamba.mamba."
    assert [f[K + k] for k in ("vocab_size", "embedding_length", "block_count", "ssm.inner_size")] == [61, 24, 2, 72]
    assert [f[K + k] for k in ("ssm.state_size", "ssm.time_step_rank", "ssm.conv_kernel")] == [6, 3, 4]
    assert f[K + "norm_folded"] is True and abs(f[K + "attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-10
    assert not any(k.startswith("tokenizer.") for k in f)  # the model folder has no tokenizer.json
    assert r.data_offset % 64 == 0 and all(t.data_offset % 64 == 0 for t in r.tensors)
    T = gguf.GGMLQuantizationType
    t = {x.name: x for x in r.tensors}
    assert "output.v2" not in t and "blk.0.attn_norm.weight" not in t  # tied; norm folded
    assert t["blk.1.ssm_conv1d.bias"].data.tolist() == [0.0] * 72  # no conv bias: zeros
    assert list(t["blk.0.ssm_in.bias"].data.shape) == [144]
    shapes = {"ssm_in": (144, 24), "ssm_x": (15, 72), "ssm_dt": (72, 3), "ssm_out": (24, 72)}
    blobs = {name: x for name, x in t.items() if name.endswith(".v2")}
    assert len(blobs) == 1 + 4 * 2 and not any(n.endswith((".values", ".codes", ".rows", ".scale")) for n in t)
    n_sparse = 0
    for name, x in blobs.items():
        assert x.tensor_type == T.I8 and len(x.data.shape) == 1, name  # a 1-D I8 tensor read as bytes
        m = unpack_matrix(np.array(x.data).view(np.uint8))  # header, counts, codes checked by the reader
        want = (61, 24) if name == "token_embd.v2" else shapes[name.split(".")[2]]
        assert (m.out, m.in_, m.dtype, m.panel) == (*want, "int8", up(want[1], 64)), name
        for c in m.classes:
            assert (c.keep.reshape(len(c.rows), -1, 4).sum(-1) == 4 - c.n).all(), name  # 4 - n kept per group
            assert c.scale is not None and (c.scale > 0).all()
        n_sparse += any(c.n > 0 for c in m.classes)
        if name == "token_embd.v2":  # one n = 0 class in token order: row t is token t's vector
            assert [c.n for c in m.classes] == [0] and m.classes[0].rows.tolist() == list(range(61))
    assert n_sparse > 0


def test_int8_scales():
    from sparsamba.compile.packed_v2 import _quantise

    w = np.array([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0]], np.float32)
    q, s = _quantise(w, 2, "w")
    assert s.tolist() == pytest.approx([1.27 / 127, 1.0])  # a zero row takes scale 1
    assert q.tolist() == [[50, -127, 0], [0, 0, 0]]


def test_tokenizer_is_carried(tiny_model_dir, tmp_path):
    path = compile_model(tiny_model_dir, tmp_path / "m.gguf", dtype="f16").path
    f = {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items()}
    assert f["tokenizer.huggingface.json"] == (tiny_model_dir / "tokenizer.json").read_text()
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == f["sparsamba.mamba.vocab_size"]
    back = read_packed(path)
    assert back.tokenizer.hf_json == f["tokenizer.huggingface.json"]


# ----------------------------------------------------------------------------------------------
# sizes


def rows_by_n(plan, name: str) -> dict[int, int]:
    lp = dict(plan.linears())[name]
    return {0: lp.out_features} if lp.dense else {c.n: len(c.rows) for c in lp.classes}


@pytest.mark.parametrize("dtype", ["f16", "int8"])
def test_sizes(models, tmp_path, dtype):
    rep = compile_model(models["d40"], tmp_path / "m.gguf", dtype=dtype)
    bw, scales = (2, 0) if dtype == "f16" else (1, 4)
    r = gguf.GGUFReader(rep.path)
    for s in rep.sizes:
        parts = [t for t in r.tensors if t.name.startswith(s.name + ".") and not t.name.endswith(".bias")]
        stored = sum(int(t.n_bytes) for t in parts)
        assert s.ours == stored, s.name  # ours = what the file holds (without alignment padding)
        assert s.dense == s.out_features * (s.in_features * bw + scales)
        assert s.csr == s.nnz * (bw + 4) + (s.out_features + 1) * 4 + s.out_features * scales
        assert s.ours == matrix_bytes(s.in_features, DTYPES[dtype], rows_by_n(rep.plan, s.name))
        if s.kind in ("ssm_in", "ssm_out"):  # ~50 % sparse: below CSR even at these tiny shapes, whose
            assert s.ours < s.csr, s  # blocks of 16 rows and chunks of 64 inputs are mostly padding
    # at a real shape, 50 % sparse is well under CSR and under dense (test_packed_v2 has 768 x 768 at n = 2)
    assert matrix_bytes(768, DTYPES[dtype], {2: 1536}) < 0.65 * 1536 * 768 * bw  # codes: 2 bits per kept value


# ----------------------------------------------------------------------------------------------
# errors


def test_bad_paths_and_nothing_half_written(models, tmp_path, monkeypatch):
    with pytest.raises(SparsambaError, match="no such directory"):
        compile_model(tmp_path / "missing", tmp_path / "x.gguf")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(SparsambaError, match="already exists"):
        compile_model(models["d24"], out)

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(SparsambaError, match="cannot write"):
        compile_model(models["d24"], out, overwrite=True)
    with pytest.raises(SparsambaError, match="cannot write"):
        compile_model(models["d24"], tmp_path / "new.gguf")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_verifier_catches_a_broken_plan(models):
    p = reorder(plan_from_model(models["d24"]))
    lp = p.blocks[0].linears["ssm_out"]
    c = lp.classes[-1]
    c.rows = c.rows.clone()
    c.rows[0] = lp.classes[0].rows[0]  # two classes writing one output
    with pytest.raises(SparsambaError, match="repeats an output row"):
        check_plan(p, "test")


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_prints_the_table(models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["compile", str(models["d40"]), "-o", str(out), "--dtype", "int8"]) == 0
    text = capsys.readouterr().out
    for word in ("ssm_in", "ssm_x", "ssm_dt", "ssm_out", "total", "dense", "CSR", "ours", "wrote"):
        assert word in text
    assert out.is_file()
    assert main(["compile", str(models["d40"]), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sparsamba compile: error:") and "already exists" in err[-1]


def test_cli_dump_after_writes_nothing(models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["compile", str(models["d24"]), "-o", str(out), "--dump-after", "reorder"]) == 0
    text = capsys.readouterr().out
    assert "blk.1" in text and "ssm_in" in text and "n=4 (removed)" in text and "π identity" in text
    assert not out.exists()


def test_a_model_written_by_prune(tiny_model_dir, tmp_path, capsys):
    """The real pipeline: `sparsamba prune` (Wanda 2:4) writes dense-with-zeros, compile packs it as c4n2."""
    from conftest import quick_prune_args

    pruned = tmp_path / "pruned"
    assert main(quick_prune_args(tiny_model_dir, tiny_model_dir.parent / "text.txt", pruned)) == 0
    out = tmp_path / "m.gguf"
    assert main(["compile", str(pruned), "-o", str(out), "--dtype", "f16"]) == 0
    capsys.readouterr()
    back = read_packed(out)
    assert back.dims.dt_rank == 2  # ssm_dt's rows have 2 weights, which 2:4 keeps: the layer stays dense
    for b in back.blocks:
        assert b.linears["ssm_dt"].dense
        for k in ("ssm_in", "ssm_x", "ssm_out"):
            lp = b.linears[k]
            assert [c.n for c in lp.classes] == [2], k  # 2:4 = C_4^2 in every row
            assert len(lp.classes[0].rows) == lp.out_features
