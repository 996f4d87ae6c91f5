"""The native engine against the torch references: the source model (fp32), and ``plan_forward`` of the
plan read back from the same packed file (the exact weights the engine sees, in any dtype). Random
Mamba-1s with odd shapes and mixed C_4^n rows (n = 0..4), the embedded model dense and pruned, every
kernel family, decode vs prefill, threads, greedy tokens, and the errors of bad calls."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EMBEDDED, compiled_models, decode_in_subprocess, max_rel
from conftest import PRUNED_CONFIGS as CONFIGS

from sparsamba.cli import main
from sparsamba.compile import compile_model, plan_forward, read_packed
from sparsamba.errors import SparsambaError
from sparsamba.eval.generate import generate
from sparsamba.model.hf import load_model
from sparsamba.runtime.engine import Engine, EngineError, set_isa

# max |engine - reference| / max |reference| over all logits. Against plan_forward (same stored
# weights) only the order of float sums differs, whatever the dtype. Against the fp32 source model,
# f16 and int8 add their rounding of the weights (measured on these models: f16 <= 7e-4, int8 <= 3e-2).
SAME_WEIGHTS = 1e-4
VS_SOURCE = {"f32": 1e-4, "f16": 3e-3, "int8": 8e-2}
# every family this CPU has; avx512-novnni: the AVX-512 family's vpmaddwd int8 path on a VNNI CPU
# (SPARSAMBA_NO_VNNI=1 is read once per process, so that one runs in a subprocess)
ISAS = ["scalar"] + [f for f in ("avx2", "avx512") if set_isa(f).startswith(f)]
if set_isa("avx512") == "avx512-vnni":
    ISAS.append("avx512-novnni")
SKIPPED_ISAS = [f for f in ("avx2", "avx512") if f not in ISAS]


def logits_in_subprocess(path, ids, isa: str, env: dict) -> np.ndarray:
    code = (
        "import sys, numpy as np; from sparsamba.runtime.engine import Engine, set_isa; "
        f"print(set_isa({isa!r}), file=sys.stderr); "
        f"np.save(sys.argv[1], Engine({str(path)!r}, threads=1).logits({ids!r}))"
    )
    out = Path(tempfile.mkdtemp()) / "logits.npy"
    p = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == isa, p.stderr  # not avx512-vnni
    return np.load(out)


@pytest.fixture(autouse=True)
def _auto_isa():
    yield
    set_isa("auto")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(model, dtype): (gguf path, source dir)} for the random configs and a pruned embedded model."""
    return compiled_models(tmp_path_factory.mktemp("engine"), seed=10)


def ids_for(vocab: int, n: int = 23, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
@pytest.mark.parametrize("name", [*CONFIGS, "embedded-pruned"])
def test_logits_match_the_references(compiled, name, dtype, isa):
    path, src = compiled[name, dtype]
    ids = ids_for(Engine(path, threads=1).info.vocab_size)
    if isa == "avx512-novnni":
        got = logits_in_subprocess(path, ids, "avx512", {"SPARSAMBA_NO_VNNI": "1"})
    else:
        assert set_isa(isa).startswith(isa)
        got = Engine(path, threads=1).logits(ids)
    same = plan_forward(read_packed(path), torch.tensor(ids)).numpy()
    with torch.no_grad():
        source = load_model(src)(torch.tensor([ids]))[0].numpy()
    assert max_rel(got, same) <= SAME_WEIGHTS
    assert max_rel(got, source) <= VS_SOURCE[dtype]


@pytest.mark.parametrize("dtype", ["f32", "int8"])
def test_a_layer_with_every_row_removed_is_not_read(tmp_path, dtype):
    """A layer pruned whole (every row n = 4) packs to the header alone, no class: the engine reads
    nothing for it and its output stays zero, as in plan_forward and the source model. Before, such a
    layer was stored dense and cost a whole dense read (found by the latency round trip, where a latency
    target removed x_proj and dt_proj of a random model entirely)."""
    from conftest import random_pruned

    from sparsamba.model.hf import save_model

    m = load_model(random_pruned(tmp_path / "r", seed=21, **CONFIGS["d40"]))
    mixers = [layer.mixer for layer in m.backbone.layers]
    with torch.no_grad():
        mixers[0].x_proj.weight.zero_()
        mixers[1].dt_proj.weight.zero_()
        mixers[1].in_proj.weight.zero_()  # ssm_in decides the channel order (fold): none left to order
    src = save_model(m, tmp_path / "m")
    path = compile_model(src, tmp_path / "m.gguf", dtype=dtype).path
    plan = read_packed(path)
    blobs = dict(plan.linears())
    for name in ("blk.0.ssm_x", "blk.1.ssm_dt", "blk.1.ssm_in"):
        assert blobs[name].classes == [] and blobs[name].blob.nbytes == 64, name
    assert blobs["blk.0.ssm_in"].blob.nbytes > 64
    ids = ids_for(m.config.vocab_size)
    same = plan_forward(plan, torch.tensor(ids)).numpy()
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0].numpy()
    assert max_rel(same, ref) < VS_SOURCE[dtype]
    for isa in [i for i in ISAS if i != "avx512-novnni"]:
        assert set_isa(isa).startswith(isa)
        eng = Engine(path, threads=1)
        assert max_rel(eng.logits(ids), same) < SAME_WEIGHTS, isa
        one = eng.generate(ids[:5], 4)
        assert Engine(path, threads=2).generate(ids[:5], 4) == one, isa
    from sparsamba.runtime.engine import opencl_devices

    if opencl_devices():  # the OpenCL backend reads the same blobs (tests/test_engine_opencl.py)
        assert max_rel(Engine(path, device="opencl").logits(ids), same) < SAME_WEIGHTS


def test_families_this_cpu_lacks_are_named():
    if SKIPPED_ISAS:
        pytest.skip(
            f"this CPU has no {', '.join(SKIPPED_ISAS)} family (they fall back to scalar): not tested here"
        )


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_embedded_model_dense(tmp_path, dtype):
    path = compile_model(EMBEDDED, tmp_path / "m.gguf", dtype=dtype).path
    eng = Engine(path, threads=1)
    ids = ids_for(eng.info.vocab_size, 40)
    with torch.no_grad():
        source = load_model(EMBEDDED)(torch.tensor([ids]))[0].numpy()
    assert max_rel(eng.logits(ids), source) <= VS_SOURCE[dtype]


def test_decode_equals_prefill_and_chunks(compiled):
    """Token by token (decode), all at once (prefill), a prompt longer than one prefill chunk (256),
    and a prompt fed in pieces all give the same logits: the carried conv window and SSM state agree."""
    path, _ = compiled["d40", "f32"]
    eng = Engine(path, threads=1)
    ids = ids_for(eng.info.vocab_size, 300, seed=1)
    whole = eng.logits(ids)
    eng.reset()
    step = np.stack([eng.decode(t) for t in ids])
    assert max_rel(step, whole) <= 1e-5
    eng.reset()
    # ids[10:12]: a prompt shorter than the conv window (K - 1 = 3) after a non-empty state
    pieces = [eng.prefill(ids[:2]), eng.prefill(ids[2:9]), eng.decode(ids[9]), eng.prefill(ids[10:12])]
    pieces.append(eng.prefill(ids[12:]))
    assert max_rel(np.stack(pieces), whole[[1, 8, 9, 11, 299]]) <= 1e-5
    assert max_rel(eng.logits(ids, all_positions=False), whole[-1]) <= 1e-6


@pytest.mark.parametrize("dtype", ["f16", "int8"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_the_same_logits(compiled, threads, dtype):
    """Each row is one thread's, whole: 2 threads give 1 thread's logits, prefill and decode alike; 3
    threads split a product's bytes unevenly over blocks of several classes (a block lost or run twice
    would show)."""
    path, _ = compiled["embedded-pruned", dtype]
    ids = ids_for(4096, 37, seed=2)
    one = Engine(path, threads=1).logits(ids)
    eng = Engine(path, threads=threads)
    assert max_rel(eng.logits(ids), one) <= 1e-6
    eng.reset()
    one_step = Engine(path, threads=1)
    assert (
        max_rel(np.stack([eng.decode(t) for t in ids[:5]]), np.stack([one_step.decode(t) for t in ids[:5]]))
        <= 1e-6
    )


@pytest.mark.parametrize("dtype", ["f16", "int8"])
def test_products_split_by_bytes_over_classes_keep_every_row(compiled, dtype):
    """Decode splits a product's blocks over the threads by bytes across all its classes; with the size
    floor off (every product split, 3 threads on the pruned model's 2-4 classes per matrix) the
    logits are 1 thread's."""
    path, _ = compiled["embedded-pruned", dtype]
    ids = ids_for(4096, 6, seed=3)
    code = (
        "import sys, numpy as np; from sparsamba.runtime.engine import Engine; "
        f"e = Engine({str(path)!r}, threads=3); "
        "np.save(sys.argv[1], np.stack([e.decode(t) for t in " + repr(ids) + "]))"
    )
    out = Path(tempfile.mkdtemp()) / "logits.npy"
    env = {**os.environ, "SPARSAMBA_MIN_SPLIT_BYTES": "0"}
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    one = Engine(path, threads=1)
    assert max_rel(np.load(out), np.stack([one.decode(t) for t in ids])) <= 1e-6


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """{(name, dtype): gguf path}: dense random models of two odd configs (biases; d_inner 72 and 54, not
    multiples of 16) and the embedded model, where dt_proj's rows are the channels in order"""
    from sparsamba.model.hf import save_model
    from sparsamba.model.mamba1 import Mamba1Config, Mamba1LM

    root = tmp_path_factory.mktemp("dense")
    dirs = {"embedded": EMBEDDED}
    for i, name in enumerate(("d24", "d18")):
        torch.manual_seed(40 + i)
        m = Mamba1LM(Mamba1Config(vocab_size=61, num_hidden_layers=2, **CONFIGS[name]))
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
        dirs[name] = save_model(m, root / name)
    return {
        (name, dtype): compile_model(d, root / f"{name}-{dtype}.gguf", dtype=dtype).path
        for name, d in dirs.items()
        for dtype in ("f32", "int8")
    }


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_schedule_on_every_model(compiled, dense, threads):
    """Decode's schedule with every product split over 1, 2 and 3 threads: each thread prepares its own
    activations, fills its slice of the next products' biases, runs the conv on its chunks of channels;
    a dense dt_proj's rows and their channels' scan are one thread's with no wait between, a pruned one's
    scan waits and runs in channel order. On the pruned random models (biases, removed rows, d_inner not
    a multiple of 16 or 64) and embedded one in every dtype, and dense ones: plan_forward's logits within
    1e-4, and the 1-thread decode's bits (a row is one thread's, whole)."""
    jobs = {}
    for name in [*CONFIGS, "embedded-pruned"]:
        for dtype in ("f32", "f16", "int8"):
            path, _ = compiled[name, dtype]
            jobs[f"{name}-{dtype}"] = (path, ids_for(Engine(path, threads=1).info.vocab_size, 9, seed=4))
    for (name, dtype), path in dense.items():
        jobs[f"dense-{name}-{dtype}"] = (path, ids_for(Engine(path, threads=1).info.vocab_size, 9, seed=4))
    got = decode_in_subprocess(jobs, threads)
    for key, (path, ids) in jobs.items():
        same = plan_forward(read_packed(path), torch.tensor(ids)).numpy()
        assert max_rel(got[key], same) <= SAME_WEIGHTS, key
        one = Engine(path, threads=1)
        assert np.array_equal(got[key], np.stack([one.decode(t) for t in ids])), key


def test_greedy_tokens_equal_the_reference_on_the_embedded_model(tmp_path):
    """Golden test: the engine's greedy continuation of a real prompt is the torch reference's."""
    from sparsamba.model.hf import load_tokenizer

    path = compile_model(EMBEDDED, tmp_path / "m.gguf", dtype="f32").path
    tok = load_tokenizer(EMBEDDED)
    prompt = tok.encode("In the beginning God created").ids
    want = generate(load_model(EMBEDDED), prompt, 32)
    eng = Engine(path, threads=1)
    assert eng.generate(prompt, 32) == want
    assert eng.tokenizer().decode(want) == tok.decode(want)


def test_sampling_is_seeded_and_respects_top_k(compiled):
    path, _ = compiled["embedded-pruned", "f32"]
    eng = Engine(path, threads=1)
    a = eng.generate([5, 6, 7], 12, temperature=1.0, top_k=5, seed=1)
    assert a == eng.generate([5, 6, 7], 12, temperature=1.0, top_k=5, seed=1)
    logits = eng.logits([5, 6, 7], all_positions=False)
    assert a[0] in set(np.argsort(logits)[-5:].tolist())


def test_bench_reports_rates(compiled):
    path, _ = compiled["d24", "f16"]
    r = Engine(path, threads=1).bench(n_prompt=16, n_gen=4, reps=2)
    assert len(r["pp"]) == len(r["tg"]) == 2 and min(r["pp"] + r["tg"]) > 0


def test_read_bandwidth_is_measured():
    from sparsamba.runtime.engine import read_bandwidth

    assert read_bandwidth(mib=8, threads=1, reps=1) > 1e8  # bytes/s: any machine reads 100 MB/s
    assert read_bandwidth(mib=8, threads=2, reps=1) > 1e8  # each thread's whole share, both readers


def test_bad_calls_are_clear_errors(compiled):
    path, _ = compiled["d24", "f32"]
    eng = Engine(path, threads=1)
    V = eng.info.vocab_size
    with pytest.raises(
        EngineError, match=rf"token {V} at position 1 is outside the vocabulary \(0 to {V - 1}\)"
    ):
        eng.logits([0, V])
    with pytest.raises(EngineError, match="token -1"):
        eng.decode(-1)
    with pytest.raises(SparsambaError, match="at least one token"):
        eng.prefill([])
    with pytest.raises(SparsambaError, match="must be a positive integer"):
        eng.generate([1], 0)
    with pytest.raises(SparsambaError, match="n_prompt must be a positive integer"):
        eng.bench(0, 4, 1)
    with pytest.raises(SparsambaError, match="token ids must be integers, got float64"):
        eng.decode(1.7)
    with pytest.raises(SparsambaError, match="temperature must be a finite number"):
        eng.generate([1], 2, temperature=float("nan"))
    with pytest.raises(SparsambaError, match="top-k must be a whole number >= 0"):
        eng.generate([1], 2, top_k=-1)
    eng.close()
    # every method after close() is an error, never a NULL or freed handle passed into C
    for call in (
        lambda: eng.decode(1),
        lambda: eng.prefill([1, 2]),
        eng.reset,
        lambda: eng.logits([1, 2]),
        lambda: eng.generate([1], 2),
        lambda: eng.bench(4, 4, 1),
        lambda: eng.kernels,
    ):
        with pytest.raises(SparsambaError, match="this Engine is closed"):
            call()
    eng.close()  # twice is fine
    for bad in (0, -1, 100000, 3_000_000_000, 1.5, True):
        with pytest.raises(SparsambaError, match="threads must be a whole number from 1"):
            Engine(path, threads=bad)


def test_one_engine_shared_by_threads(compiled):
    """Calls from several Python threads on one Engine run one at a time on its state: each thread's
    results equal the same calls made alone (it once freed prefill buffers under another's gemm)."""
    from concurrent.futures import ThreadPoolExecutor

    path, _ = compiled["d24", "f32"]
    eng = Engine(path, threads=2)
    V = eng.info.vocab_size
    prompts = [ids_for(V, 40 + 13 * i, seed=i) for i in range(6)]
    alone = [(eng.logits(p)[-1], eng.generate(p[:9], 12)) for p in prompts]

    def work(i: int):
        return eng.logits(prompts[i])[-1], eng.generate(prompts[i][:9], 12)

    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            shared = list(pool.map(work, range(6)))
            for (la, ga), (ls, gs) in zip(alone, shared):
                assert np.array_equal(la, ls) and ga == gs
    eng.close()


def test_run_command(compiled, tmp_path, capsys):
    path, src = compiled["d24", "f32"]
    assert main(["run", str(path), "--tokens", "1 2 3", "-n", "5"]) == 0
    got = [int(t) for t in capsys.readouterr().out.split()]
    assert got == Engine(path, threads=1).generate([1, 2, 3], 5)
    assert main(["run", str(path), "--tokens", "1 2 999999", "-n", "5"]) == 1
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["run", str(path), "--tokens", "1", "-n", "0"]) == 1
    assert "must be a positive integer" in capsys.readouterr().err
    assert main(["run", str(path), "--prompt", "hello"]) == 1  # this random model has no tokenizer
    assert "tokenizer" in capsys.readouterr().err


def test_run_command_with_text(tmp_path, capsys):
    path = compile_model(EMBEDDED, tmp_path / "m.gguf", dtype="f16").path
    assert main(["run", str(path), "--prompt", "And God said", "-n", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("And God said") and len(out) > len("And God said")
    assert main(["run", str(path), "--prompt", "", "-n", "8"]) == 1
    assert "empty" in capsys.readouterr().err


def test_eval_of_a_packed_model_is_the_reference_perplexity(tmp_path, capsys):
    """`sparsamba eval MODEL.gguf`: the engine's perplexity on the same windows as the torch eval; f32 packed
    equals the torch reference's within 1e-4 relative."""
    from sparsamba import assets
    from sparsamba.eval.data import eval_windows, read_text, tokenize
    from sparsamba.eval.native import EngineLM
    from sparsamba.eval.perplexity import perplexity
    from sparsamba.model.hf import load_tokenizer

    path = compile_model(EMBEDDED, tmp_path / "m.gguf", dtype="f32").path
    windows = eval_windows(tokenize(read_text(assets.HELDOUT), load_tokenizer(EMBEDDED)), 64, 3)
    with torch.no_grad():
        ref = perplexity(load_model(EMBEDDED), windows, progress=False).perplexity
    lm = EngineLM(path, threads=1)
    got = perplexity(lm, windows, progress=False).perplexity
    lm.close()
    assert abs(got - ref) / ref <= 1e-4, (got, ref)
    main(["eval", str(path), "--seqlen", "64", "--max-windows", "3", "--threads", "1"])
    assert f"perplexity  {got:.3f}" in capsys.readouterr().out
