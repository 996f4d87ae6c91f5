"""The OpenCL backend against the CPU engine on the same packed files: random odd-shaped Mamba-1s with
mixed C_4^n rows (n = 0..4) and the embedded model pruned, f32 / f16 / int8; a prompt's logits (prefill:
linear_gemm), token-by-token logits (decode: linear_gemv), prompts fed in pieces shorter than the conv
window, a prompt longer than one prefill chunk, and greedy tokens; the same runs under Oclgrind, which
reports out-of-bounds accesses and data races that a CPU device runs silently. Then the errors: no
platform, no library, a bad device index, a kernel build failure, too little device memory, half
arithmetic on a device without cl_khr_fp16, and fallback=True running on the CPU.

Runs on any OpenCL device (here: PoCL on the CPU, which has no cl_khr_fp16, so f16 models compute in
float from half storage). Without an OpenCL platform (or without Oclgrind, for its test) the tests
skip, unless SPARSAMBA_REQUIRE_OPENCL=1 (CI), which makes that a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PRUNED_CONFIGS, compiled_models, max_rel

from sparsamba.runtime.engine import Engine, EngineError, opencl_devices

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("SPARSAMBA_REQUIRE_OPENCL") == "1"
INSTALL = "apt-get install pocl-opencl-icd ocl-icd-opencl-dev opencl-c-headers, then pip install -e ."
# max |opencl - cpu| / max |cpu| over all logits. The same stored weights on both sides: only the order
# of float sums and the device's exp / log differ (measured with PoCL 3.1 and Oclgrind 21.10 on these
# models: <= 1.1e-6 for f32, f16 and int8 alike, prefill, decode and pieces).
PARITY = 1e-4
PROMPT = 23


@pytest.fixture(scope="module")
def device() -> int:
    try:
        devs = opencl_devices()
    except EngineError as e:
        if REQUIRED:
            pytest.fail(f"{e} (SPARSAMBA_REQUIRE_OPENCL=1 requires an OpenCL device; {INSTALL})")
        pytest.skip(f"no OpenCL: {e}; {INSTALL} to run the OpenCL tests")
    return devs[0].index


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, device):
    return {k: path for k, (path, _) in compiled_models(tmp_path_factory.mktemp("opencl"), seed=20).items()}


def ids_for(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
@pytest.mark.parametrize("name", [*PRUNED_CONFIGS, "embedded-pruned"])
def test_logits_match_the_cpu_engine(compiled, device, name, dtype):
    path = compiled[name, dtype]
    cpu = Engine(path, threads=1)
    ocl = Engine(path, device="opencl", device_index=device)
    assert ocl.device == "opencl" and "OpenCL" in ocl.kernels
    ids = ids_for(cpu.info.vocab_size, PROMPT, seed=len(name))
    want = cpu.logits(ids)
    got = ocl.logits(ids)  # prefill, every position
    err_prefill = max_rel(got, want)
    ocl.reset()
    step = np.stack([ocl.decode(t) for t in ids[:8]])  # decode: one token at a time
    err_decode = max_rel(step, want[:8])
    # pieces: 2 tokens, then 1, then 2 (shorter than the conv window: the carried window's shift),
    # then the rest; last-position logits only (mode 1)
    ocl.reset()
    cuts = [0, 2, 3, 5, PROMPT]
    pieces = np.stack([ocl.prefill(ids[a:b]) for a, b in zip(cuts, cuts[1:])])
    err_pieces = max_rel(pieces, want[[b - 1 for b in cuts[1:]]])
    print(f"{name} {dtype}: prefill {err_prefill:.2g} decode {err_decode:.2g} pieces {err_pieces:.2g}")
    assert max(err_prefill, err_decode, err_pieces) <= PARITY, (err_prefill, err_decode, err_pieces)


def test_long_prompt_spans_prefill_chunks(compiled, device):
    """300 tokens: a 256-token chunk, then 44 with the state carried on the device."""
    path = compiled["d40", "f32"]
    ids = ids_for(61, 300, seed=5)
    want = Engine(path, threads=1).logits(ids)
    got = Engine(path, device="opencl", device_index=device).logits(ids)
    assert max_rel(got, want) <= PARITY


@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
def test_greedy_tokens_equal_the_cpu_engine(compiled, device, dtype):
    path = compiled["embedded-pruned", dtype]
    prompt = [5, 17, 300, 42, 9]
    want = Engine(path, threads=1).generate(prompt, 16)
    assert Engine(path, device="opencl", device_index=device).generate(prompt, 16) == want


def test_bad_calls_are_clear_errors(compiled, device):
    path = compiled["d24", "f32"]
    ocl = Engine(path, device="opencl", device_index=device)
    V = ocl.info.vocab_size
    with pytest.raises(EngineError, match=rf"token {V} at position 1 is outside the vocabulary"):
        ocl.logits([0, V])
    with pytest.raises(EngineError, match="no device 99: there (is|are) "):
        Engine(path, device="opencl", device_index=99)


def test_build_failure_shows_the_build_log(compiled, device, monkeypatch):
    monkeypatch.setenv("SPARSAMBA_OPENCL_OPTIONS", "-DSB_TEST_BUILD_ERROR")
    with pytest.raises(EngineError, match=r"kernels did not build for .*SB_TEST_BUILD_ERROR: a deliberate"):
        Engine(compiled["d24", "f32"], device="opencl", device_index=device)


def test_too_little_device_memory(compiled, device, monkeypatch):
    monkeypatch.setenv("SPARSAMBA_OPENCL_MEM_LIMIT", "20000")
    with pytest.raises(EngineError, match=r"out of device memory: .* needs .* MiB"):
        Engine(compiled["embedded-pruned", "f16"], device="opencl", device_index=device)
    with pytest.warns(RuntimeWarning, match="out of device memory.*running on the CPU"):
        eng = Engine(compiled["embedded-pruned", "f16"], device="opencl", device_index=device, fallback=True)
    assert eng.device == "cpu"


def test_half_arithmetic_needs_cl_khr_fp16(compiled, device, monkeypatch):
    if opencl_devices()[device].fp16:
        pytest.skip("this device has cl_khr_fp16: nothing to refuse")
    monkeypatch.setenv("SPARSAMBA_OPENCL_HALF", "1")
    with pytest.raises(EngineError, match="does not report cl_khr_fp16"):
        Engine(compiled["d24", "f16"], device="opencl", device_index=device)


def _oclgrind_runtime() -> Path | None:
    exe = shutil.which("oclgrind")
    lib = Path(exe).resolve().parents[1] / "lib" / "oclgrind" / "liboclgrind-rt.so" if exe else None
    return lib if lib and lib.is_file() else None


def test_no_out_of_bounds_access_or_race_under_oclgrind(compiled, device):
    """Oclgrind's runtime opened in place of libOpenCL (SPARSAMBA_OPENCL_LIB): every kernel of a prefill
    and of decode steps, f32 and int8 (its simulator has no half arithmetic, and f16 storage loads the
    same way), with its bounds and data-race checks; any report fails the test."""
    _oclgrind_parity([compiled["d24", "f32"], compiled["d18", "int8"]])


def _oclgrind_parity(models: list) -> None:
    """Run the given compiled models under Oclgrind's runtime (bounds and data-race checks), CPU vs
    OpenCL logits of a prefill and three decode steps; any report, or an error past PARITY, fails."""
    paths = [str(m) for m in models]
    rt = _oclgrind_runtime()
    if rt is None:
        if REQUIRED:
            pytest.fail("oclgrind not found (SPARSAMBA_REQUIRE_OPENCL=1; apt-get install oclgrind)")
        pytest.skip("oclgrind not found; apt-get install oclgrind to run this test")
    code = f"""
import numpy as np
from sparsamba.runtime.engine import Engine
for path in {paths!r}:
    cpu, ocl = Engine(path, threads=1), Engine(path, device="opencl")
    assert "Oclgrind" in ocl.kernels, ocl.kernels
    ids = [1, 5, 9, 2, 7, 3, 11, 4, 8]
    want = cpu.logits(ids)
    got = ocl.logits(ids)
    ocl.reset()
    got = np.concatenate([got, np.stack([ocl.decode(t) for t in ids[:3]])])
    want = np.concatenate([want, want[:3]])
    print("ERR", float(np.abs(got - want).max() / np.abs(want).max()))
"""
    p = _in_subprocess(code, SPARSAMBA_OPENCL_LIB=str(rt), OCLGRIND_DATA_RACES="1")
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr[-3000:]
    errs = [float(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("ERR")]
    assert len(errs) == 2 and max(errs) <= PARITY, p.stdout


def _in_subprocess(code: str, **env: str) -> subprocess.CompletedProcess:
    """OpenCL's loader reads its environment once per process: a fresh one for each setting."""
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_no_platform_is_an_error_or_a_fallback(compiled, device, tmp_path):
    path = compiled["d24", "f32"]
    code = f"""
import warnings
import numpy as np
from sparsamba.runtime.engine import Engine, EngineError
try:
    Engine({str(path)!r}, device="opencl")
except EngineError as e:
    print("ERROR", e)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    eng = Engine({str(path)!r}, device="opencl", fallback=True)
print("DEVICE", eng.device, eng.kernels)
print("WARNED", [str(x.message) for x in w])
print("SAME", np.array_equal(eng.logits([1, 2, 3]), Engine({str(path)!r}, threads=1).logits([1, 2, 3])))
"""
    empty = tmp_path / "vendors"
    empty.mkdir()
    p = _in_subprocess(code, OCL_ICD_VENDORS=str(empty))
    assert p.returncode == 0, p.stderr
    assert "ERROR OpenCL: no platform found" in p.stdout
    assert "DEVICE cpu" in p.stdout and "running on the CPU instead" in p.stdout and "SAME True" in p.stdout

    p = _in_subprocess(code, SPARSAMBA_OPENCL_LIB=str(tmp_path / "libOpenCL-missing.so"))
    assert p.returncode == 0, p.stderr
    assert "ERROR OpenCL: cannot load" in p.stdout and "DEVICE cpu" in p.stdout


def test_run_command_on_opencl(compiled, device, capsys):
    from sparsamba.cli import main

    path = compiled["d24", "f16"]
    args = ["run", str(path), "--tokens", "1 2 3", "-n", "5"]
    assert main([*args, "--device", "opencl", "--device-index", str(device)]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == Engine(path, threads=1).generate([1, 2, 3], 5)


# ----------------------------------------------------------------------------------------------
# Mamba-2 (mamba2.cl): the same parity with the CPU engine, and Oclgrind's checks


@pytest.fixture(scope="module")
def compiled_mamba2(tmp_path_factory, device) -> dict[tuple[str, str], Path]:
    from conftest import MAMBA2_CONFIGS, random_mamba2

    from sparsamba.compile import compile_model

    root = tmp_path_factory.mktemp("opencl-mamba2")
    out = {}
    for i, (name, kw) in enumerate(MAMBA2_CONFIGS.items()):
        src = random_mamba2(root / name, seed=50 + i, pruned=True, **kw)
        for dtype in ("f32", "f16", "int8"):
            out[name, dtype] = compile_model(src, root / f"{name}-{dtype}.gguf", dtype=dtype).path
    return out


@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
@pytest.mark.parametrize("name", ["g1-p16-N16", "g3-p5-N7-bias", "g2-p9-N20-dtmax"])
def test_mamba2_matches_the_cpu_engine(compiled_mamba2, device, name, dtype):
    path = compiled_mamba2[name, dtype]
    cpu, ocl = Engine(path, threads=1), Engine(path, device="opencl", device_index=device)
    ids = ids_for(cpu.info.vocab_size, PROMPT, seed=2)
    want = cpu.logits(ids)
    assert max_rel(ocl.logits(ids), want) <= PARITY
    ocl.reset()
    pieces = [ocl.prefill(ids[:2]), ocl.prefill(ids[2:9]), *[ocl.decode(t) for t in ids[9:]]]
    assert max_rel(np.stack(pieces), want[[1, 8, *range(9, PROMPT)]]) <= PARITY
    assert ocl.generate(ids, 6) == cpu.generate(ids, 6)


def test_mamba2_no_out_of_bounds_access_or_race_under_oclgrind(compiled_mamba2, device):
    _oclgrind_parity([compiled_mamba2["g3-p5-N7-bias", "f32"], compiled_mamba2["g2-p9-N20-dtmax", "int8"]])
