"""The engine on 64-bit ARM: `sparsamba-run` cross-built by CMake alone (cmake/aarch64-linux-gnu.cmake,
static) and run under qemu-aarch64, with the NEON kernels and with the scalar ones, against the x86
engine on the same packed files: random odd-shaped Mamba-1s with mixed C_4^n rows (n = 0..4) and the
embedded model pruned, f32 / f16 / int8. A prompt's logits (prefill: the GEMM kernels) and one token's
(decode: the GEMV kernels) must match, and the greedy continuation must be the same tokens. qemu emulates
a Cortex-A53 (ARMv8.0) and `-cpu max`; on both --isa auto picks the NEON family (packed format v2 has one
NEON family: int8 through widening multiplies, f16 widened to fp32).

The text side as a new user on ARM64 Linux types it: the cross-built `sparsamba-run -m model.gguf -p TEXT`
gives the text of the x86 `sparsamba-run` (greedy and sampled with a seed: the sampler is splitmix64,
the same on every machine) and, greedy, of `sparsamba run`; and examples/generate.c, linked against the
cross-built libsparsamba.so (dynamic, as an app links it; qemu's -L gives it the target's loader, libc
and libgomp), prints the same text.

Needs Debian's gcc-aarch64-linux-gnu + libc6-dev-arm64-cross and qemu-user; without them the tests
skip, unless SPARSAMBA_REQUIRE_ARM64=1 (CI), which makes a missing toolchain a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PRUNED_CONFIGS, compiled_models, max_rel

from sparsamba.runtime.engine import Engine
from sparsamba.runtime.lib import standalone

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("SPARSAMBA_REQUIRE_ARM64") == "1"
INSTALL = "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
SYSROOT = "/usr/aarch64-linux-gnu"  # the target's loader and libraries, for dynamically linked programs
EMBEDDED = ROOT / "src" / "sparsamba" / "assets" / "kjv-mamba-tiny"
# max |arm64 - x86| / max |x86| over all logits. The same stored weights on both sides: only the order
# of float sums and the exp / log polynomials differ (measured on these models: <= 1e-6 for every
# dtype, NEON and scalar alike).
SAME_WEIGHTS = 1e-4
PROMPT = 37
NEW = 4


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (SPARSAMBA_REQUIRE_ARM64=1 requires the aarch64 build; {INSTALL})")
    pytest.skip(f"{reason}; {INSTALL} to run the aarch64 tests")


@pytest.fixture(scope="module")
def arm64_run(tmp_path_factory) -> Path:
    """`sparsamba-run` for aarch64, statically linked, from CMake with the repository's toolchain file."""
    missing = [t for t in ("cmake", "aarch64-linux-gnu-gcc", "qemu-aarch64") if not shutil.which(t)]
    if missing:
        _unavailable(f"{', '.join(missing)} not found")
    build = tmp_path_factory.mktemp("arm64")
    cfg = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'cmake' / 'aarch64-linux-gnu.cmake'}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    p = subprocess.run(cfg, capture_output=True, text=True)
    if p.returncode and "is not able to compile a simple test program" in p.stdout + p.stderr:
        _unavailable("aarch64-linux-gnu-gcc cannot link a program (no target libc: libc6-dev-arm64-cross)")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    p = subprocess.run(
        ["cmake", "--build", str(build), "--target", "sparsamba-run", "-j2"], capture_output=True, text=True
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return build / "sparsamba-run"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], Path]:
    return {
        k: path for k, (path, _) in compiled_models(tmp_path_factory.mktemp("arm64-models"), seed=30).items()
    }


def run_arm64(
    exe: Path,
    model: Path,
    ids: list[int],
    isa: str,
    out: Path,
    vocab: int,
    cpu: str = "cortex-a53",
    want: str = "",
) -> tuple[np.ndarray, list[int]]:
    """(the prompt's logits (T, V), the greedy continuation) from `sparsamba-run` under qemu, emulating
    `cpu` (cortex-a53: ARMv8.0; max: every extension qemu has)"""
    cmd = ["qemu-aarch64", "-cpu", cpu, str(exe), str(model), "--tokens", " ".join(map(str, ids))]
    cmd += ["-n", str(NEW), "--isa", isa, "-t", "1", "--info", "--logits", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    info, tokens = p.stdout.splitlines()
    assert info.endswith(f"kernels {want or ('neon' if isa == 'auto' else isa)}"), info
    return np.fromfile(out, dtype="<f4").reshape(len(ids), vocab), [int(t) for t in tokens.split()]


@pytest.mark.parametrize("isa", ["neon", "scalar"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
@pytest.mark.parametrize("name", [*PRUNED_CONFIGS, "embedded-pruned"])
def test_arm64_matches_x86(arm64_run, compiled, tmp_path, name, dtype, isa):
    path = compiled[name, dtype]
    eng = Engine(path, threads=1)  # x86, its best kernels
    V = eng.info.vocab_size
    ids = np.random.default_rng(len(name)).integers(0, V, PROMPT).tolist()
    for prompt in (ids, ids[:1]):  # prefill (GEMM), then one token alone (GEMV)
        got, tokens = run_arm64(arm64_run, path, prompt, isa, tmp_path / "logits.bin", V)
        want = eng.logits(prompt)
        err = max_rel(got, want)
        assert err <= SAME_WEIGHTS, f"{name} {dtype} {isa} T={len(prompt)}: max rel err {err:.2e}"
        assert tokens == eng.generate(prompt, NEW)


@pytest.mark.parametrize("cpu", ["cortex-a53", "max"])
def test_arm64_picks_neon_by_default(arm64_run, compiled, tmp_path, cpu):
    path = compiled["d24", "f32"]
    eng = Engine(path, threads=1)
    got, _ = run_arm64(arm64_run, path, [1, 2, 3], "auto", tmp_path / "logits.bin", eng.info.vocab_size, cpu)
    assert max_rel(got, eng.logits([1, 2, 3])) <= SAME_WEIGHTS


# ----------------------------------------------------------------------------------------------
# text in, text out, and the library an app links


@pytest.fixture(scope="module")
def arm64_app(arm64_run) -> Path:
    """examples/generate.c against the cross-built libsparsamba.so, in the same build tree"""
    build = arm64_run.parent
    p = subprocess.run(
        ["cmake", "--build", str(build), "--target", "sparsamba", "example-generate", "-j2"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return build / "example-generate"


@pytest.fixture(scope="module")
def embedded_gguf(tmp_path_factory) -> Path:
    from sparsamba.compile import compile_model

    return compile_model(EMBEDDED, tmp_path_factory.mktemp("arm64-emb") / "m.gguf", dtype="f32").path


def text_of(cmd: list[str]) -> str:
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


TEXT_N = 16


@pytest.mark.parametrize("prompt", ["In the beginning", "καὶ 中文 😀"])
def test_arm64_text_mode_matches_x86_and_python(arm64_run, embedded_gguf, prompt):
    args = ["-m", str(embedded_gguf), "-p", prompt, "-n", str(TEXT_N), "-t", "1"]
    arm = text_of(["qemu-aarch64", str(arm64_run), *args])
    assert arm == text_of([str(standalone()), *args]) and len(arm) > len(prompt) + 10
    py = [sys.executable, "-m", "sparsamba", "run", str(embedded_gguf), "--prompt", prompt, "-n", str(TEXT_N)]
    assert arm == text_of([*py, "--threads", "1"])
    sampled = [*args, "--temp", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed"]
    arm7 = text_of(["qemu-aarch64", str(arm64_run), *sampled, "7"])
    assert arm7 == text_of([str(standalone()), *sampled, "7"])
    assert arm7 != text_of(["qemu-aarch64", str(arm64_run), *sampled, "8"])  # the seed is used


def test_arm64_library_example(arm64_run, arm64_app, embedded_gguf):
    readelf = shutil.which("readelf")
    lib = next(arm64_run.parent.glob("libsparsamba.so.*.*.*"))
    if readelf:
        d = subprocess.run([readelf, "-h", "-d", str(lib)], capture_output=True, text=True).stdout
        assert "AArch64" in d and "Library soname: [libsparsamba.so." in d, d
    prompt = "And God said"
    arm = text_of(["qemu-aarch64", "-L", SYSROOT, str(arm64_app), str(embedded_gguf), prompt, str(TEXT_N)])
    py = [sys.executable, "-m", "sparsamba", "run", str(embedded_gguf), "--prompt", prompt, "-n", str(TEXT_N)]
    assert arm == text_of([*py, "--threads", "1"]) and len(arm) > len(prompt) + 10
    p = subprocess.run(
        ["qemu-aarch64", "-L", SYSROOT, str(arm64_app), "/nonexistent.gguf", "x"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and "/nonexistent.gguf: cannot open" in p.stderr


@pytest.fixture(scope="module")
def compiled_mamba2(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Two random pruned Mamba-2s (head_dim 16 / N 16 and head_dim 9 / N 20: the NEON SSD step's full
    vectors and its tails) in every dtype."""
    from conftest import MAMBA2_CONFIGS, random_mamba2

    from sparsamba.compile import compile_model

    root = tmp_path_factory.mktemp("arm64-mamba2")
    out = {}
    for i, name in enumerate(("g1-p16-N16", "g2-p9-N20-dtmax")):
        src = random_mamba2(root / name, seed=40 + i, pruned=True, **MAMBA2_CONFIGS[name])
        for dtype in ("f32", "f16", "int8"):
            out[name, dtype] = compile_model(src, root / f"{name}-{dtype}.gguf", dtype=dtype).path
    return out


@pytest.mark.parametrize("isa", ["neon", "scalar"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
@pytest.mark.parametrize("name", ["g1-p16-N16", "g2-p9-N20-dtmax"])
def test_arm64_mamba2_matches_x86(arm64_run, compiled_mamba2, tmp_path, name, dtype, isa):
    path = compiled_mamba2[name, dtype]
    eng = Engine(path, threads=1)
    V = eng.info.vocab_size
    ids = np.random.default_rng(len(name)).integers(0, V, PROMPT).tolist()
    for prompt in (ids, ids[:1]):
        got, tokens = run_arm64(arm64_run, path, prompt, isa, tmp_path / "logits.bin", V)
        err = max_rel(got, eng.logits(prompt))
        assert err <= SAME_WEIGHTS, f"Mamba-2 {name} {dtype} {isa} T={len(prompt)}: max rel err {err:.2e}"
        assert tokens == eng.generate(prompt, NEW)
