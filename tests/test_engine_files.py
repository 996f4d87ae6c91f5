"""Bad packed files: the engine answers every one with a clear error naming the file and what is wrong,
never a crash or a read out of bounds. Each case runs in-process through Python and, in a separate
AddressSanitizer + UndefinedBehaviorSanitizer build of the standalone `sparsamba-run` (built here by
CMake), where any invalid read or undefined behaviour would abort with a report."""

from __future__ import annotations

import os
import random
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import PRUNED_CONFIGS, random_pruned

from sparsamba.compile import compile_model
from sparsamba.export.llamacpp import export_gguf
from sparsamba.runtime.engine import Engine, EngineError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A small valid int8 packed file: classes with codes, rows and scales."""
    root = tmp_path_factory.mktemp("files")
    src = random_pruned(root / "m", seed=7, **PRUNED_CONFIGS["d24"])
    return compile_model(src, root / "good.gguf", dtype="int8").path


@pytest.fixture(scope="module")
def asan_run(tmp_path_factory) -> Path:
    """`sparsamba-run` built with ASan + UBSan (the same sources as the package's engine)."""
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the sanitizer build of the engine (pip install cmake)"
    build = tmp_path_factory.mktemp("asan")
    cfg = [cmake, "-S", str(ROOT), "-B", str(build), "-DSPARSAMBA_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug"]
    subprocess.run(cfg, check=True, capture_output=True)
    subprocess.run(
        [cmake, "--build", str(build), "--target", "sparsamba-run", "-j2"], check=True, capture_output=True
    )
    return build / "sparsamba-run"


def sanitized(asan_run: Path, path: Path, *args: str, limit_as: int | None = None):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")

    def limit() -> None:
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    p = subprocess.run(
        [str(asan_run), str(path), "-n", "2", *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=limit,
    )
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr[-3000:]
    return p


def expect_error(path: Path, asan_run: Path, *needles: str) -> str:
    with pytest.raises(EngineError) as e:
        Engine(path, threads=1)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    for n in needles:
        assert n in msg, msg
    p = sanitized(asan_run, path)
    assert p.returncode == 1 and "sparsamba-run: error:" in p.stderr and needles[0] in p.stderr, p.stderr
    return msg


def mutated(good: Path, tmp: Path, edits: list[tuple[int, bytes]], name: str = "bad.gguf") -> Path:
    data = bytearray(good.read_bytes())
    for off, b in edits:
        data[off : off + len(b)] = b
    out = tmp / name
    out.write_bytes(bytes(data))
    return out


def offsets(path: Path):
    """File offsets of metadata values and tensor infos, from the gguf package's memory-mapped reader."""
    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data

    def at(part) -> int:
        return part.ctypes.data - base

    kv = {k: at(f.parts[-1]) for k, f in r.fields.items()}
    # tensor info parts: name length, name, n_dims, dims, type, offset
    ti = {
        t.name: dict(
            name=at(t.field.parts[1]),
            dims=at(t.field.parts[3]),
            type=at(t.field.parts[4]),
            offset=at(t.field.parts[5]),
            data=t.data_offset,
            nbytes=t.n_bytes,
        )
        for t in r.tensors
    }
    return kv, ti


def test_the_good_file_runs_clean_under_the_sanitizers(good, asan_run):
    p = sanitized(asan_run, good, "--tokens", "1 2 3 4 5 6 7 8 9")
    assert p.returncode == 0, p.stderr
    assert [int(t) for t in p.stdout.split()] == Engine(good, threads=1).generate(list(range(1, 10)), 2)
    scalar = sanitized(asan_run, good, "--tokens", "1 2 3 4 5 6 7 8 9", "--isa", "scalar")
    assert scalar.stdout == p.stdout


def test_container_errors(good, asan_run, tmp_path):
    data = good.read_bytes()
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", asan_run, "not a GGUF file")
    expect_error(mutated(good, tmp_path, [(0, b"GGML")]), asan_run, "not a GGUF file (wrong magic")
    expect_error(mutated(good, tmp_path, [(4, (2).to_bytes(4, "little"))]), asan_run, "GGUF version 2")
    expect_error(mutated(good, tmp_path, [(8, (2**40).to_bytes(8, "little"))]), asan_run, "do not fit")
    # a key whose string length runs past the end of the file
    expect_error(
        mutated(good, tmp_path, [(24, (2**50).to_bytes(8, "little"))]), asan_run, "truncated key-value"
    )
    kv, ti = offsets(good)
    header_end = min(t["data"] for t in ti.values())
    data_end = max(t["data"] + t["nbytes"] for t in ti.values())  # past it: alignment padding only
    for cut in sorted({30, 100, 400, header_end // 2, header_end - 5, data_end - 3}):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        expect_error(tmp_path / "cut.gguf", asan_run, "")


def test_tensor_info_errors(good, asan_run, tmp_path):
    _, ti = offsets(good)
    t = ti["blk.0.ssm_in.v2"]
    expect_error(
        mutated(good, tmp_path, [(t["type"], (2).to_bytes(4, "little"))]),
        asan_run,
        "'blk.0.ssm_in.v2': type 2 is not one this engine reads",
    )
    # F16 would double the values' bytes into the next tensor's: caught as an overlap
    expect_error(
        mutated(good, tmp_path, [(t["type"], (1).to_bytes(4, "little"))]),
        asan_run,
        "overlaps the data of another tensor",
    )
    # a type of the same size that the loader does not expect there
    d = ti["blk.0.ssm_d"]
    expect_error(
        mutated(good, tmp_path, [(d["type"], (26).to_bytes(4, "little"))]),
        asan_run,
        "'blk.0.ssm_d' has type I32, expected F32",
    )
    expect_error(
        mutated(good, tmp_path, [(t["dims"], (2**62).to_bytes(8, "little"))]),
        asan_run,
        "dimension 0",
        "out of range",
    )
    expect_error(
        mutated(good, tmp_path, [(t["dims"], (4).to_bytes(8, "little"))]),
        asan_run,
        "'blk.0.ssm_in.v2': 4 bytes, shorter than the 64-byte matrix header",
    )
    expect_error(
        mutated(good, tmp_path, [(t["offset"], (2**40).to_bytes(8, "little"))]), asan_run, "outside the"
    )
    expect_error(mutated(good, tmp_path, [(t["offset"], (3).to_bytes(8, "little"))]), asan_run, "misaligned")


def test_alignment_overlap_and_duplicate_names(good, asan_run, tmp_path):
    kv, ti = offsets(good)
    # an alignment of 1 or 2 would let f32 / i32 tensors sit misaligned (undefined behaviour in C)
    for a in (1, 2, 3):
        expect_error(
            mutated(good, tmp_path, [(kv["general.alignment"], a.to_bytes(4, "little"))]),
            asan_run,
            "general.alignment must be a u32 power of two from 8",
        )
    # two tensors pointing at the same bytes: a small file must not describe a larger model
    data = good.read_bytes()
    a, b = ti["blk.0.ssm_d"], ti["blk.0.ssm_dt.bias"]
    expect_error(
        mutated(good, tmp_path, [(b["offset"], data[a["offset"] : a["offset"] + 8])]),
        asan_run,
        "overlaps the data of another tensor",
    )
    # one name twice (blk.1.ssm_d renamed blk.0.ssm_d: same length)
    n = ti["blk.1.ssm_d"]["name"]
    expect_error(mutated(good, tmp_path, [(n, b"blk.0.ssm_d")]), asan_run, "'blk.0.ssm_d' appears twice")


def test_a_fifo_is_refused_without_waiting(asan_run, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    # in a child first, with a time limit: a regression would block in open() forever
    p = subprocess.run([str(asan_run), str(fifo), "-n", "2"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "not a regular file" in p.stderr, p.stderr
    with pytest.raises(EngineError, match="not a regular file"):
        Engine(fifo, threads=1)


def blob_class(
    good: Path, ti: dict, name: str, min_rows: int = 1, n: int | None = None
) -> tuple[int, int, int, int]:
    """(file offset of a class section of blob `name`, its n, rows, blocks): the first with >= min_rows rows
    (and the given n)"""
    t = ti[name]
    data = good.read_bytes()
    offs = struct.unpack_from("<4Q", data, t["data"] + 32)
    for cn, o in enumerate(offs):
        rows, nb = struct.unpack_from("<2I", data, t["data"] + o + 4) if o else (0, 0)
        if o and rows >= min_rows and n in (None, cn):
            return t["data"] + o, cn, rows, nb
    raise LookupError(f"{name} has no such class")


def test_model_level_errors(good, asan_run, tmp_path):
    kv, ti = offsets(good)
    for v in (9, 1):  # 1: a file of packed format v1
        expect_error(
            mutated(good, tmp_path, [(kv["sparsamba.format_version"], v.to_bytes(4, "little"))]),
            asan_run,
            f"packed format version {v}; this engine reads format version 2",
            "recompile it with sparsamba compile",
        )
    # 'f16' -> 'f17': an unknown dtype enum
    expect_error(mutated(good, tmp_path, [(kv["sparsamba.compile.dtype"], b"f17\0")]), asan_run, "")
    # the blob's dtype is not the file's
    t = ti["blk.1.ssm_out.v2"]
    expect_error(
        mutated(good, tmp_path, [(t["data"] + 8, (1).to_bytes(4, "little"))]),
        asan_run,
        "'blk.1.ssm_out.v2': dtype 1, the file's compile dtype is 2",
    )
    # block counts that do not match the class: rows + 16, blocks + 1
    at, n, rows, nb = blob_class(good, ti, "blk.1.ssm_out.v2")
    for off, v in ((4, rows + 16), (8, nb + 1)):
        expect_error(
            mutated(good, tmp_path, [(at + off, v.to_bytes(4, "little"))]),
            asan_run,
            f"'blk.1.ssm_out.v2': class n={n}: declared counts do not match the class",
        )
    # n = 2 codes whose two kept positions of a group coincide (int8: the stream after index and scales)
    at, n, rows, nb = blob_class(good, ti, "blk.1.ssm_out.v2", n=2)
    expect_error(
        mutated(good, tmp_path, [(at + 64 + 128 * nb, (0b0101).to_bytes(4, "little"))]),
        asan_run,
        "class n=2: row 0, group 0: the two kept positions are not distinct and ascending",
    )
    at, n, rows, nb = blob_class(good, ti, "blk.0.ssm_x.v2", min_rows=2)
    expect_error(
        mutated(good, tmp_path, [(at + 64, (10**6).to_bytes(4, "little"))]),
        asan_run,
        "writes output 1000000, which is out of range",
    )
    first = good.read_bytes()[at + 64 : at + 68]
    expect_error(mutated(good, tmp_path, [(at + 68, first)]), asan_run, "already written by another row")
    expect_error(
        mutated(good, tmp_path, [(at + 64 + 64 * nb, np.float32(np.nan).tobytes())]),
        asan_run,
        "'blk.0.ssm_x.v2'",
        "has scale nan (not finite and positive)",
    )
    # the embedding must be token order: rows 0 and 1 swapped
    at, *_ = blob_class(good, ti, "token_embd.v2")
    swap = [(at + 64, (1).to_bytes(4, "little")), (at + 68, (0).to_bytes(4, "little"))]
    expect_error(
        mutated(good, tmp_path, swap),
        asan_run,
        "'token_embd.v2' must be one n = 0 class of every row in token order",
    )


def test_a_llama_cpp_file_is_pointed_to_compile(tiny_model_dir, asan_run, tmp_path):
    plain = export_gguf(tiny_model_dir, tmp_path / "plain.gguf")
    expect_error(plain, asan_run, "architecture 'mamba' is not a sparsamba packed model", "sparsamba compile")


def test_missing_and_stray_tensors(good, asan_run, tmp_path):
    _, ti = offsets(good)
    data = good.read_bytes()
    # rename a tensor in place (same length): one expected tensor goes missing, one unknown appears
    name = b"blk.1.ssm_d"
    name_at = data.index(len(name).to_bytes(8, "little") + name) + 8
    bad = mutated(good, tmp_path, [(name_at, b"blk.1.ssm_q")])
    expect_error(bad, asan_run, "missing tensor 'blk.1.ssm_d'")
    # a misnamed optional tensor (the in_proj bias) would silently drop out: it is refused as unknown
    assert "blk.0.ssm_in.bias" in ti
    name = b"blk.0.ssm_in.bias"
    name_at = data.index(len(name).to_bytes(8, "little") + name) + 8
    bad = mutated(good, tmp_path, [(name_at, b"blk.0.ssm_in.biaz")])
    expect_error(bad, asan_run, "tensor 'blk.0.ssm_in.biaz' is not part of a sparsamba.mamba model")


def test_random_header_corruption_never_crashes(good, asan_run, tmp_path):
    """Flip bytes anywhere in the header and the checked arrays: every load either succeeds or fails
    with an EngineError; the sanitizer build sees no invalid access."""
    kv, ti = offsets(good)
    header_end = min(t["data"] for t in ti.values())
    rng = random.Random(0)
    data = good.read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for i in range(240):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(header_end)] = rng.randrange(256)
        path = tmp_path / "fuzz.gguf"
        path.write_bytes(bytes(buf))
        try:
            Engine(path, threads=1).logits([1, 2, 3])
            outcomes["ok"] += 1
        except EngineError:
            outcomes["error"] += 1
        if i % 8 == 0:
            assert sanitized(asan_run, path).returncode in (0, 1)
    assert outcomes["error"] > 50


def test_a_model_larger_than_the_address_space_limit(good, asan_run, tmp_path):
    """A file that cannot be mapped within the process's memory limit: a clear error, no crash. (The
    plain build: sanitizers reserve terabytes of address space and cannot run under RLIMIT_AS.)"""
    big = tmp_path / "big.gguf"
    shutil.copy(good, big)
    with open(big, "r+b") as f:  # trailing bytes after the data are allowed; a hole costs no disk
        f.truncate(3 << 30)
    run = Path(__import__("sparsamba").__path__[0]) / "bin" / "sparsamba-run"
    runs = [
        p
        for p in [run, *(Path(x) / "bin" / "sparsamba-run" for x in __import__("sparsamba").__path__)]
        if p.is_file()
    ]
    assert runs, "the package's sparsamba-run was not installed"
    p = subprocess.run(
        [str(runs[0]), str(big), "-n", "1"],
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)),
    )
    assert p.returncode == 1 and "cannot map" in p.stderr and "memory" in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------
# sparsamba.mamba2 files: the same loader checks on Mamba-2's keys and tensors


@pytest.fixture(scope="module")
def good2(tmp_path_factory) -> Path:
    """A small valid int8 Mamba-2 file: three groups, biases, time_step_limit set, C_4^n classes."""
    from conftest import MAMBA2_CONFIGS, random_mamba2

    root = tmp_path_factory.mktemp("files2")
    src = random_mamba2(root / "m", seed=9, pruned=True, **MAMBA2_CONFIGS["g3-p5-N7-bias"])
    return compile_model(src, root / "good2.gguf", dtype="int8").path


def test_mamba2_good_file_runs_clean_under_the_sanitizers(good2, asan_run):
    for isa in ("auto", "scalar"):
        p = sanitized(asan_run, good2, "--tokens", "1 2 3 4 5 6 7 8 9", "--isa", isa)
        assert p.returncode == 0, p.stderr
        assert [int(t) for t in p.stdout.split()] == Engine(good2, threads=1).generate(list(range(1, 10)), 2)


def test_mamba2_key_errors(good2, asan_run, tmp_path):
    kv, _ = offsets(good2)
    k = "sparsamba.mamba2."

    def u32(key: str, v: int) -> Path:
        return mutated(good2, tmp_path, [(kv[k + key], v.to_bytes(4, "little"))])

    def f32(key: str, v: float) -> Path:
        return mutated(good2, tmp_path, [(kv[k + key], struct.pack("<f", v))])

    expect_error(
        u32("ssm.head_count", 7), asan_run, f"key '{k}ssm.head_count' = 7 does not divide ssm.inner_size 60"
    )
    expect_error(u32("ssm.group_count", 5), asan_run, f"key '{k}ssm.group_count' = 5 does not divide")
    expect_error(u32("ssm.state_size", 0), asan_run, f"key '{k}ssm.state_size' = 0 is out of range")
    expect_error(u32("ssm.conv_kernel", 65), asan_run, f"key '{k}ssm.conv_kernel' = 65 is out of range")
    # a valid but different shape: every tensor sized from it is refused by name
    expect_error(
        u32("ssm.state_size", 6), asan_run, "'blk.0.ssm_conv1d.weight' has shape (102, 3), expected (96, 3)"
    )
    expect_error(f32("ssm.dt_min", 1.0), asan_run, "need 0 <= dt_min <= dt_max")
    expect_error(f32("ssm.dt_min", float("nan")), asan_run, "need 0 <= dt_min <= dt_max")
    expect_error(f32("ssm.dt_max", -1.0), asan_run, "need 0 <= dt_min <= dt_max")
    expect_error(f32("attention.layer_norm_rms_epsilon", float("inf")), asan_run, "must be finite")
    expect_error(
        mutated(good2, tmp_path, [(kv["sparsamba.format_version"], (3).to_bytes(4, "little"))]),
        asan_run,
        "packed format version 3; this engine reads format version 2",
    )


def test_mamba2_tensor_errors(good2, asan_run, tmp_path):
    _, ti = offsets(good2)
    data = good2.read_bytes()

    def renamed(old: bytes, new: bytes) -> Path:
        at = data.index(len(old).to_bytes(8, "little") + old) + 8
        return mutated(good2, tmp_path, [(at, new)])

    for name in ("ssm_a", "ssm_d"):
        expect_error(
            renamed(f"blk.1.{name}".encode(), b"blk.1.ssm_q"), asan_run, f"missing tensor 'blk.1.{name}'"
        )
    expect_error(
        renamed(b"blk.0.ssm_dt.bias", b"blk.0.ssm_dt.biaz"), asan_run, "missing tensor 'blk.0.ssm_dt.bias'"
    )
    expect_error(
        renamed(b"blk.1.ssm_out.bias", b"blk.1.ssm_out.biaz"), asan_run, "missing tensor 'blk.1.ssm_out.bias'"
    )
    expect_error(
        renamed(b"blk.1.ssm_out.v2", b"blk.1.ssm_ou2.v2"), asan_run, "missing tensor 'blk.1.ssm_out.v2'"
    )
    # conv (cd, K) stored as (K, cd): the same bytes, the wrong shape
    c = ti["blk.0.ssm_conv1d.weight"]
    swap = [(c["dims"], (102).to_bytes(8, "little")), (c["dims"] + 8, (3).to_bytes(8, "little"))]
    expect_error(
        mutated(good2, tmp_path, swap),
        asan_run,
        "'blk.0.ssm_conv1d.weight' has shape (3, 102), expected (102, 3)",
    )
    d = ti["blk.1.ssm_a"]
    expect_error(
        mutated(good2, tmp_path, [(d["type"], (26).to_bytes(4, "little"))]),
        asan_run,
        "'blk.1.ssm_a' has type I32, expected F32",
    )
    # ssm_in's blob declares a different output count
    t = ti["blk.0.ssm_in.v2"]
    expect_error(
        mutated(good2, tmp_path, [(t["data"] + 12, (100).to_bytes(4, "little"))]),
        asan_run,
        "'blk.0.ssm_in.v2'",
    )


def test_mamba2_random_header_corruption_never_crashes(good2, asan_run, tmp_path):
    kv, ti = offsets(good2)
    header_end = min(t["data"] for t in ti.values())
    rng = random.Random(1)
    data = good2.read_bytes()
    errors = 0
    for i in range(120):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(header_end)] = rng.randrange(256)
        path = tmp_path / "fuzz.gguf"
        path.write_bytes(bytes(buf))
        try:
            Engine(path, threads=1).logits([1, 2, 3])
        except EngineError:
            errors += 1
        if i % 8 == 0:
            assert sanitized(asan_run, path).returncode in (0, 1)
    assert errors > 25
