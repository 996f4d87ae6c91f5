"""The engine on 64-bit ARM: `sparsamba-run` cross-built by CMake alone (cmake/aarch64-linux-gnu.cmake,
static) and run under qemu-aarch64, with the NEON kernels and with the scalar ones, against the x86
engine on the same packed files: random odd-shaped Mamba-1s with mixed C_4^n rows (n = 0..4) and the
embedded model pruned, f32 / f16 / int8. A prompt's logits (prefill: the GEMM kernels) and one token's
(decode: the GEMV kernels) must match, and the greedy continuation must be the same tokens. qemu emulates
a Cortex-A53 (ARMv8.0), where --isa auto picks the fp32 NEON family, and `-cpu max` for neon-fp16 (fp16
arithmetic in the f16 GEMV, ARMv8.2-A), which must stay within a looser bound.

Needs Debian's gcc-aarch64-linux-gnu + libc6-dev-arm64-cross and qemu-user; without them the tests
skip, unless SPARSAMBA_REQUIRE_ARM64=1 (CI), which makes a missing toolchain a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PRUNED_CONFIGS, compiled_models, max_rel

from sparsamba.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("SPARSAMBA_REQUIRE_ARM64") == "1"
INSTALL = "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
# max |arm64 - x86| / max |x86| over all logits. The same stored weights on both sides: only the order
# of float sums and the exp / log polynomials differ (measured on these models: <= 1e-6 for every
# dtype, NEON and scalar alike).
SAME_WEIGHTS = 1e-4
# neon-fp16 (the gemv of f16 classes in fp16: inputs, products and partial sums over 64 inputs rounded
# to fp16's 11 bits, then summed in fp32): measured on these models 2.7e-4 .. 7.2e-4, prompt and one
# token alike; the bound leaves a margin of about 7x
FP16 = 5e-3
PROMPT = 37  # > 32 tokens: the GEMM's 32-token tiles and its 8-token tail both run
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
    `cpu` (cortex-a53: ARMv8.0, no fp16 arithmetic; max: every extension qemu has, fp16 included)"""
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


def test_arm64_picks_neon_by_default(arm64_run, compiled, tmp_path):
    """a core without fp16 arithmetic (cortex-a53, ARMv8.0): auto falls back to the fp32 NEON family"""
    path = compiled["d24", "f32"]
    V = Engine(path, threads=1).info.vocab_size
    got, _ = run_arm64(arm64_run, path, [1, 2, 3], "auto", tmp_path / "logits.bin", V)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("name", [*PRUNED_CONFIGS, "embedded-pruned"])
def test_arm64_fp16_matches_x86(arm64_run, compiled, tmp_path, name):
    """`-cpu max` has FEAT_FP16: auto picks neon-fp16, whose decode (gemv) of f16 classes multiplies and
    sums in fp16. The prompt's logits and one token's stay within FP16 of the x86 engine's, and the
    embedded model's greedy continuation is the same tokens (the random ones may have near-ties)."""
    path = compiled[name, "f16"]
    eng = Engine(path, threads=1)
    V = eng.info.vocab_size
    ids = np.random.default_rng(len(name)).integers(0, V, PROMPT).tolist()
    for prompt in (ids, ids[:1]):
        got, tokens = run_arm64(
            arm64_run, path, prompt, "auto", tmp_path / "logits.bin", V, "max", "neon-fp16"
        )
        err = max_rel(got, eng.logits(prompt))
        assert err <= FP16, f"{name} neon-fp16 T={len(prompt)}: max rel err {err:.2e}"
        if name == "embedded-pruned":
            assert tokens == eng.generate(prompt, NEW)
