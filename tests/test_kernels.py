"""Every kernel family against the scalar reference and numpy, kernel by kernel: tests/c/test_kernels.c
(the matrix products of packed format v2, gemv and gemm of every class n = 0..3 in f32 / f16 / int8 on
case files this module writes with the numpy packer: K below a group, K not a multiple of a chunk,
several panels; then silu, softplus, mul_silu, scan_step, read_sum), built by CMake (target
sparsamba-test-kernels) for this machine, and for aarch64 with cmake/aarch64-linux-gnu.cmake and run
under qemu-aarch64 (NEON). AVX-512 runs with and without VNNI (SPARSAMBA_NO_VNNI=1). A family this CPU or
build lacks is skipped with its name; the aarch64 one needs the cross toolchain and qemu (without them it
skips, unless SPARSAMBA_REQUIRE_ARM64=1). The loader's blob check (sb_v2_check) refuses each malformed
blob with one message."""

from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_packed_v2 import SHAPES, random_classes

from sparsamba.compile.packed_v2 import (
    CHUNK,
    DTYPES,
    dense_of,
    pack_matrix,
    quantise_activations,
    unpack_matrix,
    up,
)

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_ARM64 = os.environ.get("SPARSAMBA_REQUIRE_ARM64") == "1"
TARGET = "sparsamba-test-kernels"
HOST_FAMILIES = ("scalar", "avx2", "avx512", "avx512-novnni")
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
        pytest.skip(f"neon: {why}")
    return exe


def _run(cmd: list[str], family: str, env: dict | None = None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = (p.stdout + p.stderr).strip()
    if p.returncode == SKIP:
        pytest.skip(out.splitlines()[-1] if out else f"{family}: not available here")
    assert p.returncode == 0, f"{family} kernels differ from the scalar reference:\n{out[-4000:]}"
    assert out.splitlines()[-1].startswith(f"PASS {family}"), out[-2000:]
    print(out.splitlines()[-2])  # the parity figures per dtype


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[Path]:
    return write_cases(tmp_path_factory.mktemp("v2cases"))


@pytest.mark.parametrize("family", HOST_FAMILIES)
def test_host_kernels_match_reference(host_exe, cases, family):
    if family != "scalar" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"{family}: not an x86-64 machine ({platform.machine()})")
    env = {**os.environ, "SPARSAMBA_NO_VNNI": "1" if family == "avx512-novnni" else "0"}
    name = family.removesuffix("-novnni")
    _run([str(host_exe), name, *map(str, cases)], name, env)


def test_arm64_kernels_match_reference(arm64_exe, cases):
    _run(["qemu-aarch64", "-cpu", "max", str(arm64_exe), "neon", *map(str, cases)], "neon")


# (K, out) with enough rows per class (~out / 5) that the decode kernels read several block streams side
# by side (4 runs of blocks per half of a class, then the leftover blocks one by one): a tail-only K, several
# panels with a short last chunk, and one K of whole chunks
STREAM_SHAPES = [(48, 1000), (2100, 1400), (192, 1400)]
# (K, out) of one class per n (every row the same n, as a uniform recipe packs it): the blocks' rows are
# contiguous (the decode kernels' vector scatter), K a short tail of 13 groups after 7 chunks (int8
# n = 1: a pair across two groups, one of them past K), 13 blocks read 4 side by side, then one by one
UNIFORM_SHAPES = [(500, 200)]


def uniform_classes(rng, out: int, K: int, n: int):
    """A C_4^n matrix with the same n on every row: one class of rows 0..out-1."""
    G = -(-K // 4)
    keep = np.ones((out, G, 4), bool)
    for r in range(out):
        for g in range(G):
            keep[r, g, rng.permutation(4)[:n]] = False
    keep = keep.reshape(out, -1)
    W = rng.standard_normal((out, 4 * G)).astype(np.float32) * keep
    return [(n, np.arange(out), keep, W[:, :K])], W[:, :K]


def write_cases(d: Path, seed: int = 0, tokens: int = 21) -> list[Path]:
    # 21 tokens: the channel-major prefill takes 16 (AVX-512) or 8 (AVX2) tokens per vector, so both
    # whole vectors and a masked last one run
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    shapes = [(K, out, None) for K, out in SHAPES + STREAM_SHAPES]
    shapes += [(K, out, n) for K, out in UNIFORM_SHAPES for n in range(4)]
    for K, out, n in shapes:
        for dtype, dt in DTYPES.items():
            if n is None:
                classes, _ = random_classes(rng, out, K)
            else:
                classes, _ = uniform_classes(rng, out, K, n)
            blob = pack_matrix(out, K, classes, dtype)
            W = dense_of(unpack_matrix(blob)).astype(np.float64)
            x = rng.standard_normal((tokens, K)).astype(np.float32)
            xe = quantise_activations(x) if dtype == "int8" else x
            y = (xe.astype(np.float64) @ W.T).astype(np.float32)
            xm = np.zeros((tokens, up(K, CHUNK)), np.float32)
            xm[:, :K] = np.abs(x)
            xm = np.repeat(xm.reshape(tokens, -1, CHUNK).max(-1), CHUNK, 1)[:, :K]
            mag = (xm.astype(np.float64) @ np.abs(W).T).astype(np.float32)
            p = d / f"case-{K}-{out}{'' if n is None else f'-n{n}'}-{dtype}.bin"
            p.write_bytes(
                struct.pack("<4IQ", K, out, dt, tokens, len(blob))
                + x.tobytes()
                + y.tobytes()
                + mag.tobytes()
                + blob.tobytes()
            )
            paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------
# Malformed blobs: one message each, never a read out of bounds


def _mutate(case: Path, out: Path, edit) -> Path:
    raw = bytearray(case.read_bytes())
    K, o, _, T, bs = struct.unpack_from("<4IQ", raw)
    at = 24 + 4 * (T * K + 2 * T * o)
    blob = bytearray(raw[at:])
    blob = edit(blob)
    out.write_bytes(bytes(raw[:16]) + struct.pack("<Q", len(blob)) + bytes(raw[24:at]) + bytes(blob))
    return out


def _u32(b: bytearray, off: int, v: int) -> bytearray:
    struct.pack_into("<I", b, off, v)
    return b


def test_check_refuses_malformed_blobs(host_exe, cases, tmp_path):
    case = next(c for c in cases if c.name == "case-200-70-int8.bin")
    K, o, _, T, _ = struct.unpack_from("<4IQ", case.read_bytes())
    blob = bytes(case.read_bytes()[24 + 4 * (T * K + 2 * T * o) :])
    offs = struct.unpack_from("<4Q", blob, 32)
    cls = {
        n: (o, *struct.unpack_from("<2I", blob, o + 4)) for n, o in enumerate(offs) if o
    }  # n: (off, rows, nb)
    first, second = sorted(cls)[:2]
    o1, o2 = cls[first][0], cls[second][0]
    padded = next(n for n, (o, r, nb) in cls.items() if r % 16)  # a class with padding rows
    op, rp, nbp = cls[padded]
    bad = {
        "magic": (lambda b: _u32(b, 0, 0x31565053), "bad magic"),
        "version": (lambda b: _u32(b, 4, 1), "matrix layout version 1"),
        "dtype": (lambda b: _u32(b, 8, 1), "dtype 1"),
        "shape": (lambda b: _u32(b, 12, 71), "header says (71, 200)"),
        "panel": (lambda b: _u32(b, 20, 100), "panel 100"),
        "rows": (lambda b: _u32(b, o1 + 4, cls[first][1] + 16), "declared counts do not match"),
        "class n": (lambda b: _u32(b, o1, first + 1), f"class at slot n={first} declares n={first + 1}"),
        "truncated": (lambda b: b[:-64], "the blob has"),
        "index range": (lambda b: _u32(b, o2 + 64, 70), "out of range"),
        "index repeat": (
            lambda b: _u32(b, o2 + 64, struct.unpack_from("<I", b, o1 + 64)[0]),
            "already written",
        ),
        "padding index": (lambda b: _u32(b, op + 64 + 4 * rp, 0), f"padding row {rp} has index 0"),
        "scale": (lambda b: _u32(b, o2 + 64 + 64 * cls[second][2], 0x7FC00000), "scale nan"),
    }
    if 2 in cls:  # the first group of row 0 keeps position 1 twice
        bad["n=2 codes"] = (
            lambda b: _u32(b, cls[2][0] + 64 + 128 * cls[2][2], 0b0101),
            "not distinct and ascending",
        )
    for name, (edit, msg) in bad.items():
        p = _mutate(case, tmp_path / f"bad-{name.replace(' ', '-')}.bin", lambda b, e=edit: e(bytearray(b)))
        r = subprocess.run([str(host_exe), "--check", str(p)], capture_output=True, text=True)
        assert r.returncode == 1 and msg in r.stdout, (name, r.stdout)
    r = subprocess.run([str(host_exe), "--check", str(case)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok"
