"""Packed format v2 of one matrix (docs/packed-format.md, "Matrix blob"): the numpy writer against its
reader, and the C kernels (src/engine/cpu/linear_v2*.c: scalar reference, AVX2, AVX-512 with and
without VNNI, NEON under qemu) against numpy's product of the unpacked matrix, decode (gemv) and
prefill (gemm) alike, on odd shapes: K below a group, K not a multiple of a chunk, several panels.
The loader's validation (sb_v2_check) refuses each malformed blob with one message."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

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
CPU = ROOT / "src" / "engine" / "cpu"
HARNESS = ROOT / "tests" / "c" / "test_linear_v2.c"
SHAPES = [
    (1, 20),
    (3, 33),
    (5, 17),
    (48, 40),
    (63, 19),
    (64, 50),
    (65, 33),
    (200, 70),
    (1000, 24),
    (2049, 37),
    (3000, 21),
]


def random_classes(rng, out: int, K: int):
    """A random C_4^n matrix (n per row in 0..4) as the packer's classes and its dense fp32 form."""
    G = -(-K // 4)
    n = rng.integers(0, 5, out)
    W = rng.standard_normal((out, 4 * G)).astype(np.float32)
    keep = np.ones((out, G, 4), bool)
    for r in range(out):
        for g in range(G):
            keep[r, g, rng.permutation(4)[: n[r]]] = False
    W *= keep.reshape(out, -1)
    keep = keep.reshape(out, -1)
    classes = [(c, np.flatnonzero(n == c), keep[n == c], W[n == c, :K]) for c in range(4) if (n == c).any()]
    return classes, W[:, :K]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pack_unpack_round_trip(dtype):
    rng = np.random.default_rng(1)
    for K, out in SHAPES:
        classes, W = random_classes(rng, out, K)
        m = unpack_matrix(pack_matrix(out, K, classes, dtype))
        got = dense_of(m)
        if dtype == "f32":
            assert np.array_equal(got, W), (K, out)
        elif dtype == "f16":
            assert np.array_equal(got, W.astype(np.float16).astype(np.float32)), (K, out)
        else:  # within half a quantisation step of each row's largest weight
            step = np.abs(W).max(1, keepdims=True) / 127
            assert (np.abs(got - W) <= 0.5001 * step).all(), (K, out)
        for c, (n, rows, keep, _) in zip(m.classes, classes):
            assert c.n == n and np.array_equal(c.rows, rows) and np.array_equal(c.keep, keep)


def test_sizes_are_the_formulas_and_well_under_csr():
    from sparsamba.compile.packed_v2 import matrix_bytes

    rng = np.random.default_rng(2)
    for K, out in SHAPES:
        classes, W = random_classes(rng, out, K)
        for dtype, dt in DTYPES.items():
            blob = pack_matrix(out, K, classes, dtype)
            assert len(blob) == matrix_bytes(K, dt, {c[0]: len(c[1]) for c in classes})
    # 768 x 768 at n = 2 everywhere, f16: values + 2-bit codes + padding, against CSR's 6 bytes per weight
    keep = np.tile(np.array([True, True, False, False]), (768, 192))
    blob = pack_matrix(768, 768, [(2, np.arange(768), keep, np.ones((768, 768), np.float32) * keep)], "f16")
    assert len(blob) < 0.45 * (768 * 384 * 6 + 769 * 4)


def write_cases(d: Path, seed: int = 0, tokens: int = 3) -> list[Path]:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for K, out in SHAPES:
        for dtype, dt in DTYPES.items():
            classes, _ = random_classes(rng, out, K)
            blob = pack_matrix(out, K, classes, dtype)
            W = dense_of(unpack_matrix(blob)).astype(np.float64)
            x = rng.standard_normal((tokens, K)).astype(np.float32)
            xe = quantise_activations(x) if dtype == "int8" else x
            y = (xe.astype(np.float64) @ W.T).astype(np.float32)
            xm = np.zeros((tokens, up(K, CHUNK)), np.float32)
            xm[:, :K] = np.abs(x)
            xm = np.repeat(xm.reshape(tokens, -1, CHUNK).max(-1), CHUNK, 1)[:, :K]
            mag = (xm.astype(np.float64) @ np.abs(W).T).astype(np.float32)
            p = d / f"case-{K}-{out}-{dtype}.bin"
            p.write_bytes(
                struct.pack("<4IQ", K, out, dt, tokens, len(blob))
                + x.tobytes()
                + y.tobytes()
                + mag.tobytes()
                + blob.tobytes()
            )
            paths.append(p)
    return paths


def build(cc: str, out: Path, extra: list[str], sources: dict[str, list[str]]) -> Path:
    """Compile each source with its own flags (ISA flags on ISA files only), then link."""
    objs = []
    for src, flags in sources.items():
        o = out.parent / (Path(src).stem + ".o")
        subprocess.run(
            [
                cc,
                "-std=c11",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                f"-I{CPU}",
                *flags,
                "-c",
                src,
                "-o",
                str(o),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        objs.append(str(o))
    subprocess.run([cc, *objs, *extra, "-lm", "-o", str(out)], check=True, capture_output=True, text=True)
    return out


X86 = {
    str(HARNESS): [],
    str(CPU / "linear_v2.c"): [],
    str(CPU / "linear_v2_ref.c"): [],
    str(CPU / "linear_v2_avx2.c"): ["-mavx2", "-mfma", "-mf16c"],
    str(CPU / "linear_v2_avx512.c"): ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[Path]:
    return write_cases(tmp_path_factory.mktemp("v2cases"))


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the x86 families need an x86-64 CPU")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    return build(cc, tmp_path_factory.mktemp("v2bin") / "test_linear_v2", [], X86)


@pytest.mark.parametrize("vnni", ["1", "0"])
def test_kernels_match_numpy_x86(harness, cases, vnni):
    """Every family this CPU runs (the output names the ones it skipped); vnni=0 runs the AVX-512 int8
    path with vpmaddwd on a CPU that has VNNI."""
    env = {**os.environ, "SPARSAMBA_NO_VNNI": "0" if vnni == "1" else "1"}
    p = subprocess.run([str(harness), *map(str, cases)], capture_output=True, text=True, env=env)
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert f"{len(cases)} cases, 0 failures" in p.stdout


def test_kernels_match_numpy_arm64(cases, tmp_path):
    from test_engine_arm64 import _unavailable

    missing = [t for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64") if not shutil.which(t)]
    if missing:
        _unavailable(f"{', '.join(missing)} not found")
    srcs = {
        str(HARNESS): [],
        str(CPU / "linear_v2.c"): [],
        str(CPU / "linear_v2_ref.c"): [],
        str(CPU / "linear_v2_neon.c"): [],
    }
    exe = build("aarch64-linux-gnu-gcc", tmp_path / "test_linear_v2", ["-static"], srcs)
    p = subprocess.run(["qemu-aarch64", str(exe), *map(str, cases)], capture_output=True, text=True)
    print(p.stdout)
    assert p.returncode == 0 and f"{len(cases)} cases, 0 failures" in p.stdout, p.stdout[-3000:]
    assert "neon" in p.stdout


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


def test_check_refuses_malformed_blobs(harness, cases, tmp_path):
    case = next(c for c in cases if c.name == "case-200-70-int8.bin")
    blob = bytes(case.read_bytes()[24 + 4 * (3 * 200 + 2 * 3 * 70) :])
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
        r = subprocess.run([str(harness), "--check", str(p)], capture_output=True, text=True)
        assert r.returncode == 1 and msg in r.stdout, (name, r.stdout)
    r = subprocess.run([str(harness), "--check", str(case)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", ["f32", "int8"])
def test_a_plans_layers_pack_to_what_they_compute(tmp_path, dtype):
    """Every layer of a reordered plan (dense layers and mixed classes, odd shapes) packs into a blob that
    unpacks to the plan's own weights; matvec is the product the engine's kernels compute."""
    import torch
    from conftest import PRUNED_CONFIGS, random_pruned

    from sparsamba.compile.packed_v2 import matvec, pack_plan_linear
    from sparsamba.compile.passes import reorder
    from sparsamba.compile.plan import dense_rows, plan_from_model

    plan = reorder(plan_from_model(random_pruned(tmp_path / "m", seed=3, **PRUNED_CONFIGS["d18"])))
    rng = np.random.default_rng(0)
    for b in plan.blocks:
        for k, lp in b.linears.items():
            m = unpack_matrix(pack_plan_linear(lp, dtype, k))
            W, want = dense_of(m), dense_rows(lp).numpy()
            if dtype == "f32":
                assert np.array_equal(W, want), k
            else:
                assert np.abs(W - want).max() <= 0.5001 * np.abs(want).max() / 127, k
            x = rng.standard_normal((2, lp.in_features)).astype(np.float32)
            xe = quantise_activations(x) if dtype == "int8" else x
            ref = torch.from_numpy(xe) @ torch.from_numpy(W).T
            assert np.allclose(matvec(m, W, x), ref.numpy(), rtol=1e-5, atol=1e-6), k
