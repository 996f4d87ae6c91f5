"""Short coverage-guided fuzz runs: the engine's loader and forward pass (libFuzzer, ASan + UBSan), and
the Python readers of a safetensors header and of a packed GGUF's tokenizer (atheris).

The long runs, and how to reproduce a crash, are in tests/fuzz/README.md. Seeds are models made by
the tests' random-model maker. Needs Debian's clang and its compiler runtime (libclang-rt-dev) and the
`fuzz` extra (atheris); without them the tests skip, unless SPARSAMBA_REQUIRE_FUZZ=1 (CI) makes that a
failure. SPARSAMBA_FUZZ_SECONDS sets each run's length (default 30 for the engine, a third of it for
each Python target)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PRUNED_CONFIGS, SAMPLE_TEXT, random_pruned

from sparsamba.compile import compile_model

ROOT = Path(__file__).resolve().parents[1]
SECONDS = int(os.environ.get("SPARSAMBA_FUZZ_SECONDS", "30"))


def _missing() -> str | None:
    clang, cmake = shutil.which("clang"), shutil.which("cmake")
    if not clang or not cmake:
        return "clang or cmake not found (Debian: apt-get install clang libclang-rt-dev)"
    probe = subprocess.run(
        [clang, "-fsanitize=fuzzer", "-x", "c", "-", "-o", os.devnull],
        input="#include <stdint.h>\n#include <stddef.h>\n"
        "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return 0; }\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        return "clang cannot link libFuzzer (Debian: apt-get install libclang-rt-dev)"
    return None


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory) -> Path:
    why = _missing()
    if why:
        if os.environ.get("SPARSAMBA_REQUIRE_FUZZ") == "1":
            pytest.fail(f"SPARSAMBA_REQUIRE_FUZZ=1 but {why}")
        pytest.skip(why)
    build = tmp_path_factory.mktemp("fuzz-build")
    env = dict(os.environ, CC="clang")
    cfg = ["-DSPARSAMBA_FUZZ=ON", "-DSPARSAMBA_OPENMP=OFF", "-DSPARSAMBA_OPENCL=OFF", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"]
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *cfg], check=True, capture_output=True, env=env)
    subprocess.run(["cmake", "--build", str(build), "--target", "fuzz_engine", "-j2"], check=True, capture_output=True)
    return build / "fuzz_engine"


def test_loader_and_forward_survive_fuzzing(fuzzer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, dtype in enumerate(("f32", "f16", "int8")):
        src = random_pruned(tmp_path / f"m{i}", seed=i, vocab=23, **PRUNED_CONFIGS["d24"])
        compile_model(src, corpus / f"seed-{dtype}.gguf", dtype=dtype)
    # a model with a tokenizer (a small byte-level BPE): the tokenizer's keys are fuzzed too
    from sparsamba.model.train_tiny import train_tokenizer

    tok = train_tokenizer(SAMPLE_TEXT, 300)
    src = random_pruned(tmp_path / "mt", seed=5, vocab=tok.get_vocab_size(), **PRUNED_CONFIGS["d24"])
    tok.save(str(src / "tokenizer.json"))
    compile_model(src, corpus / "seed-tokenizer.gguf", dtype="int8")
    # a Mamba-2 file: its loader and forward (model_mamba2.c, forward_mamba2.c) are fuzzed too
    from conftest import MAMBA2_CONFIGS, random_mamba2

    src = random_mamba2(tmp_path / "mamba2", seed=6, pruned=True, vocab=23, **MAMBA2_CONFIGS["g3-p5-N7-bias"])
    compile_model(src, corpus / "seed-mamba2.gguf", dtype="int8")
    (corpus / "empty").write_bytes(b"")
    artifacts = tmp_path / "crashes"
    artifacts.mkdir()
    p = subprocess.run(
        [
            str(fuzzer),
            f"-max_total_time={SECONDS}",
            "-max_len=262144",
            "-rss_limit_mb=2048",
            "-timeout=20",
            f"-artifact_prefix={artifacts}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=SECONDS + 300,
    )
    tail = p.stderr[-4000:]
    assert p.returncode == 0 and not any(artifacts.iterdir()), tail
    runs = [line for line in p.stderr.splitlines() if line.startswith("Done ")]
    assert runs and int(runs[-1].split()[1]) > 100, tail  # it really ran


def _atheris_or_skip() -> None:
    import importlib.util

    if importlib.util.find_spec("atheris") is None:
        why = "atheris is not installed (pip install -e '.[fuzz]')"
        if os.environ.get("SPARSAMBA_REQUIRE_FUZZ") == "1":
            pytest.fail(f"SPARSAMBA_REQUIRE_FUZZ=1 but {why}")
        pytest.skip(why)


@pytest.mark.parametrize("target", ["safetensors", "tokenizer"])
def test_python_readers_survive_fuzzing(target, tmp_path):
    import sys

    _atheris_or_skip()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    src = random_pruned(tmp_path / "m", seed=3, vocab=23, **PRUNED_CONFIGS["d24"])
    if target == "safetensors":
        (corpus / "seed").write_bytes((src / "model.safetensors").read_bytes())
    else:
        from sparsamba import assets
        from sparsamba.model.hf import save_model  # noqa: F401 - the seed needs a tokenizer: the embedded one

        tok_src = random_pruned(tmp_path / "t", seed=3, like=assets.DEFAULT_MODEL)
        compile_model(tok_src, corpus / "seed.gguf", dtype="int8")
    seconds = max(SECONDS // 3, 5)
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz" / "fuzz_python.py"),
            target,
            f"-max_total_time={seconds}",
            "-rss_limit_mb=4096",
            "-timeout=30",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, SPARSAMBA_FUZZ_CONFIG=str(src / "config.json")),
        timeout=seconds + 300,
    )
    tail = p.stderr[-4000:]
    assert p.returncode == 0 and not list(tmp_path.glob("crash-*")), tail
    runs = [line for line in p.stderr.splitlines() if line.startswith("Done ")]
    assert runs and int(runs[-1].split()[1]) > 10, tail
