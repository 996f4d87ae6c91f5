"""Mamba-2 through the compiler and the native engine: random Mamba-2s with odd shapes (several n_groups,
head_dim, d_state, conv widths, time_step_limit set, biases, tied and untied heads), dense and with
C_4^n rows at every n, compiled to f32 / f16 / int8; the engine's logits against ``plan_forward`` of the
file, our torch reference and transformers' Mamba2ForCausalLM (full forward: its one-token path ignores
time_step_limit); decode == prefill; 1 thread == 2 threads; every kernel family; the CLI; and the
configs the compiler refuses. (OpenCL: tests/test_engine_opencl.py; NEON: tests/test_engine_arm64.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MAMBA2_CONFIGS as CONFIGS
from conftest import decode_in_subprocess, random_mamba2, rel_err

from sparsamba.cli import main
from sparsamba.compile import compile_model, plan_forward, read_packed
from sparsamba.errors import SparsambaError
from sparsamba.model.hf import load_model
from sparsamba.runtime.engine import Engine, set_isa

# as tests/test_engine.py: against plan_forward of the file only float order differs; against the fp32
# source, f16 / int8 add their weight rounding (measured here: f16 <= 1e-3, int8 <= 3e-2)
SAME_WEIGHTS = 1e-4
VS_SOURCE = {"f32": 1e-4, "f16": 3e-3, "int8": 8e-2}
ISAS = ["scalar"] + [f for f in ("avx2", "avx512") if set_isa(f).startswith(f)]
set_isa("auto")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(config, pruned, dtype): (packed file, source dir)}"""
    root = tmp_path_factory.mktemp("m2")
    out = {}
    for i, (name, kw) in enumerate(CONFIGS.items()):
        for pruned in (False, True):
            src = random_mamba2(root / f"{name}-{pruned}", seed=20 + i, pruned=pruned, **kw)
            for dtype in ("f32", "f16", "int8"):
                rep = compile_model(src, root / f"{name}-{pruned}-{dtype}.gguf", dtype=dtype)
                out[name, pruned, dtype] = (rep.path, src, rep)
    return out


def ids_for(vocab: int, n: int = 23, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(autouse=True)
def _auto_isa():
    yield
    set_isa("auto")


def test_the_compiler_plans_mamba2(compiled):
    path, src, rep = compiled["g3-p5-N7-bias", True, "f16"]
    # the verifier ran after every pass and on the file read back
    assert list(rep.errors) == ["load", "reorder", "fold", "fuse", "pack", "file"]
    assert rep.errors["fuse"] <= 1e-5 and rep.errors["file"] <= 3e-3
    back = read_packed(path)
    assert back.dims.arch == "mamba2" and back.dims.n_heads == 12 and back.dims.n_groups == 3
    assert back.dims.dt_limit == (0.02, 0.5) and back.norm_folded
    assert not back.blocks[0].linears["ssm_in"].dense and not back.blocks[0].linears["ssm_out"].dense
    n_seen = {c.n for b in back.blocks for lp in b.linears.values() for c in lp.classes}
    assert n_seen == {0, 1, 2, 3}
    assert "ssm_norm.weight" not in back.blocks[0].tensors  # folded into ssm_out
    import gguf

    r = gguf.GGUFReader(path)
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "sparsamba.mamba2"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_the_references(compiled, name, pruned, dtype, isa):
    path, src, _ = compiled[name, pruned, dtype]
    assert set_isa(isa).startswith(isa)
    eng = Engine(path, threads=1)
    assert eng.info.arch == 2 and eng.info.n_group == CONFIGS[name]["n_groups"]
    ids = ids_for(eng.info.vocab_size)
    got = eng.logits(ids)  # (l, V), prefill
    ref = plan_forward(read_packed(path), torch.tensor(ids)).numpy()
    err, mean = rel_err(got, ref)
    assert err <= SAME_WEIGHTS, f"vs plan_forward: max rel {err:.3g}, mean |Δ| {mean:.3g}"
    with torch.no_grad():
        src_logits = load_model(src)(torch.tensor([ids]))[0].numpy()
    err, mean = rel_err(got, src_logits)
    assert err <= VS_SOURCE[dtype], f"vs the source model: max rel {err:.3g}, mean |Δ| {mean:.3g}"


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(compiled, name, pruned):
    tf = pytest.importorskip("transformers")
    path, src, _ = compiled[name, pruned, "f32"]
    hf = tf.Mamba2ForCausalLM.from_pretrained(src).eval()
    ids = ids_for(hf.config.vocab_size, n=27, seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), use_cache=False).logits[0].numpy()  # the full forward
    err, mean = rel_err(Engine(path, threads=1).logits(ids), ref)
    assert err <= 1e-4, f"vs transformers: max rel {err:.3g}, mean |Δ| {mean:.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_equals_prefill_and_threads_agree(compiled, name, isa):
    path, _, _ = compiled[name, True, "f32"]
    assert set_isa(isa).startswith(isa)
    eng = Engine(path, threads=1)
    ids = ids_for(eng.info.vocab_size, n=19, seed=5)
    full = eng.logits(ids)
    eng.reset()
    steps = np.stack([eng.decode(t) for t in ids])
    err, mean = rel_err(steps, full)
    assert err <= 1e-5, f"decode vs prefill: max rel {err:.3g}, mean |Δ| {mean:.3g}"
    # a prompt in two prefills, then decode: the conv window and the state carried across calls
    eng.reset()
    part = np.stack([eng.prefill(ids[:7]), eng.prefill(ids[7:12]), *[eng.decode(t) for t in ids[12:]]])
    assert rel_err(part, full[[6, 11, *range(12, len(ids))]])[0] <= 1e-5
    two = Engine(path, threads=2)
    assert two.threads == 2
    assert np.array_equal(two.logits(ids), full), "2 threads must give the 1-thread logits exactly"


@pytest.mark.parametrize("threads", [2, 3])
def test_decode_schedule_with_every_product_split(compiled, threads):
    """Decode with every product split (SPARSAMBA_MIN_SPLIT_BYTES=0, read once per process, so in a
    subprocess) over 2 and 3 threads: each thread prepares its own norms and activations and fills its
    slice of the next ssm_in's bias; the heads (and their Δ) are split over the team. Every config,
    dense and pruned, every dtype: plan_forward's logits (within 1e-4) and the 1-thread decode's bits."""
    jobs = {}
    for name in CONFIGS:
        for pruned in (False, True):
            for dtype in ("f32", "f16", "int8"):
                path = compiled[name, pruned, dtype][0]
                jobs[f"{name}-{pruned}-{dtype}"] = (
                    str(path),
                    ids_for(Engine(path, threads=1).info.vocab_size, 7, 6),
                )
    got = decode_in_subprocess(jobs, threads)
    for key, (path, ids) in jobs.items():
        same = plan_forward(read_packed(path), torch.tensor(ids)).numpy()
        assert rel_err(got[key], same)[0] <= SAME_WEIGHTS, key
        one = Engine(path, threads=1)
        assert np.array_equal(got[key], np.stack([one.decode(t) for t in ids])), key


def test_greedy_generation_matches_the_torch_reference(compiled):
    from sparsamba.eval.generate import generate

    path, src, _ = compiled["g1-p16-N16", True, "f32"]
    prompt = ids_for(53, n=9, seed=8)
    want = generate(load_model(src), prompt, max_new_tokens=12)
    assert Engine(path, threads=1).generate(prompt, 12) == want


def test_cli_compile_and_run(compiled, tmp_path, capsys):
    _, src, _ = compiled["g2-p9-N20-dtmax", True, "f32"]
    out = tmp_path / "m2.gguf"
    assert main(["compile", str(src), "-o", str(out), "--dtype", "int8"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["run", str(out), "--tokens", "1 2 3 4", "-n", "5"]) == 0
    toks = capsys.readouterr().out.split()
    assert len(toks) == 5 and all(t.isdigit() for t in toks), toks
    assert [int(t) for t in toks] == Engine(out, threads=1).generate([1, 2, 3, 4], 5)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (dict(rms_norm=False), "rms_norm"),
        (dict(norm_before_gate=True), "norm_before_gate"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(head_dim=7), "head_dim"),
    ],
)
def test_unsupported_configs_are_refused_at_compile(compiled, tmp_path, edit, needle, capsys):
    _, src, _ = compiled["g1-p16-N16", False, "f32"]
    d = tmp_path / "m"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SparsambaError, match=needle):
        compile_model(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert main(["compile", str(d), "-o", str(tmp_path / "y.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_a_prompt_longer_than_one_prefill_chunk(compiled):
    """300 tokens: two prefill chunks (256 + 44), the conv window and the state carried between them."""
    path, src, _ = compiled["g3-p5-N7-bias", True, "f32"]
    eng = Engine(path, threads=1)
    ids = ids_for(eng.info.vocab_size, 300, seed=1)
    whole = eng.logits(ids)
    eng.reset()
    assert rel_err(np.stack([eng.decode(t) for t in ids]), whole)[0] <= 1e-5
    with torch.no_grad():
        ref = load_model(src)(torch.tensor([ids]))[0].numpy()
    assert rel_err(whole, ref)[0] <= 1e-4


TRAINED = Path(__file__).resolve().parents[1] / "src" / "sparsamba" / "assets" / "kjv-mamba2-tiny"


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_greedy_tokens_equal_the_reference_on_the_trained_mamba2(tmp_path, dtype):
    """Golden test on the trained Mamba-2: the engine's greedy continuation of a real prompt is the torch
    reference's, text in and text out through the file's tokenizer."""
    from sparsamba.eval.generate import generate
    from sparsamba.model.hf import load_tokenizer

    path = compile_model(TRAINED, tmp_path / "m.gguf", dtype=dtype).path
    tok = load_tokenizer(TRAINED)
    prompt = tok.encode("In the beginning God created").ids
    want = generate(load_model(TRAINED), prompt, 32)
    eng = Engine(path, threads=1)
    assert eng.generate(prompt, 32) == want
    assert eng.tokenizer().decode(want) == tok.decode(want)


def test_run_a_trained_mamba2_from_text(tmp_path, capsys):
    out = tmp_path / "m2.gguf"
    assert main(["compile", str(TRAINED), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--prompt", "And God said", "-n", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("And God said") and len(text) > len("And God said") + 8, text


@pytest.mark.parametrize("isa", [f for f in ISAS if f != "scalar"] or ["none"])
def test_simd_families_match_the_scalar_reference(compiled, isa):
    """The SSD head step (cpu/ssd_avx2.c) and the shared per-channel kernels against the scalar reference
    (cpu/ssd.c), decode and prefill, on head_dim 9 / d_state 20 (whole vectors and tails)."""
    if isa == "none":
        pytest.skip("no SIMD family on this CPU")
    path, _, _ = compiled["g2-p9-N20-dtmax", True, "f32"]
    ids = ids_for(53, n=17, seed=4)
    out = {}
    for f in ("scalar", isa):
        assert set_isa(f).startswith(f)
        eng = Engine(path, threads=1)
        out[f] = eng.logits(ids)
        eng.reset()
        out[f + "-decode"] = np.stack([eng.decode(t) for t in ids])
    assert rel_err(out[isa], out["scalar"])[0] <= 2e-6
    assert rel_err(out[isa + "-decode"], out["scalar-decode"])[0] <= 2e-6


def test_decode_stages_of_a_mamba2(compiled):
    from sparsamba.runtime.profile import decode_stages, stages_table

    path = compiled["g3-p5-N7-bias", True, "f16"][0]
    with Engine(path, threads=1) as eng:
        r = decode_stages(eng, 6)
    blocks = r["blocks"]
    # Mamba-2 has no x_proj / dt_proj: those stay empty, the others hold the step's time
    assert all(b["x_proj"] == 0 and b["dt_proj"] == 0 for b in blocks)
    assert all(b[k] > 0 for b in blocks for k in ("norm", "in_proj", "conv", "prep", "scan", "out_proj"))
    stages = [v for b in blocks for v in b.values()] + list(r["top"].values())
    assert 0.9 * r["total"] <= sum(stages) <= 1.001 * r["total"]
    assert all(b["in_proj"] > 0 and b["out_proj"] > 0 for b in r["bytes"]["blocks"])
    table = stages_table(r)
    assert "| scan |" in table and "x_proj" not in table
