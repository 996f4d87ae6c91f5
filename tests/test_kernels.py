"""Every kernel family against the scalar reference, kernel by kernel: tests/c/test_kernels.c (gemv and gemm
of every class n = 0..3 and the dense layout, f32 / f16 / int8, odd shapes; silu, softplus, mul_silu,
scan_step, read_sum), built by CMake (target sparsamba-test-kernels) for this machine, and for aarch64 with
cmake/aarch64-linux-gnu.cmake and run under qemu-aarch64 `-cpu max` (NEON and fp16 arithmetic). A family
this CPU or build lacks is skipped with its name; the aarch64 ones need the cross toolchain and qemu
(without them they skip, unless SPARSAMBA_REQUIRE_ARM64=1)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_ARM64 = os.environ.get("SPARSAMBA_REQUIRE_ARM64") == "1"
TARGET = "sparsamba-test-kernels"
HOST_FAMILIES = ("scalar", "avx2")
ARM64_FAMILIES = ("neon", "neon-fp16")
SKIP = 77  # the program's exit status for a family this CPU or build lacks


def _build(build: Path, *extra: str) -> Path | None:
    # no OpenMP, no OpenCL: the kernels alone, and a shorter build
    cfg = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    cfg += ["-DSPARSAMBA_OPENMP=OFF", "-DSPARSAMBA_OPENCL=OFF", *extra]
    p = subprocess.run(cfg, capture_output=True, text=True)
    if p.returncode and "is not able to compile a simple test program" in p.stdout + p.stderr:
        return None
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    p = subprocess.run(
        ["cmake", "--build", str(build), "--target", TARGET, "-j2"], capture_output=True, text=True
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return build / TARGET


@pytest.fixture(scope="module")
def host_exe(tmp_path_factory) -> Path:
    if not shutil.which("cmake"):
        pytest.skip("cmake not found")
    exe = _build(tmp_path_factory.mktemp("kernels-host"))
    assert exe is not None, "the host C compiler cannot link a program"
    return exe


@pytest.fixture(scope="module")
def arm64_exe(tmp_path_factory) -> Path:
    missing = [t for t in ("cmake", "aarch64-linux-gnu-gcc", "qemu-aarch64") if not shutil.which(t)]
    why = f"{', '.join(missing)} not found" if missing else ""
    exe = None
    if not missing:
        toolchain = ROOT / "cmake" / "aarch64-linux-gnu.cmake"
        exe = _build(tmp_path_factory.mktemp("kernels-arm64"), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}")
        why = "" if exe else "aarch64-linux-gnu-gcc cannot link a program (no target libc)"
    if why:
        if REQUIRED_ARM64:
            pytest.fail(f"{why} (SPARSAMBA_REQUIRE_ARM64=1 requires the aarch64 kernel tests)")
        pytest.skip(f"neon, neon-fp16: {why}")
    return exe


def _run(cmd: list[str], family: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = (p.stdout + p.stderr).strip()
    if p.returncode == SKIP:
        pytest.skip(out.splitlines()[-1] if out else f"{family}: not available here")
    assert p.returncode == 0, f"{family} kernels differ from the scalar reference:\n{out[-4000:]}"
    assert out.splitlines()[-1].startswith(f"PASS {family}:"), out[-2000:]


@pytest.mark.parametrize("family", HOST_FAMILIES)
def test_host_kernels_match_reference(host_exe, family):
    if family == "avx2" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"avx2: not an x86-64 machine ({platform.machine()})")
    _run([str(host_exe), family], family)


@pytest.mark.parametrize("family", ARM64_FAMILIES)
def test_arm64_kernels_match_reference(arm64_exe, family):
    # -cpu max: every extension qemu emulates, fp16 arithmetic included, so both families run
    _run(["qemu-aarch64", "-cpu", "max", str(arm64_exe), family], family)
