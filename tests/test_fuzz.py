"""A short coverage-guided fuzz run of the engine's loader and forward pass (libFuzzer, ASan + UBSan).

The long run, and how to reproduce a crash, are in tests/fuzz/README.md. Seeds are packed models of
every dtype made by the tests' random-model maker. Needs Debian's clang and its compiler runtime
(libclang-rt-dev); without them the test skips, unless SPARSAMBA_REQUIRE_FUZZ=1 (CI) makes that a
failure. SPARSAMBA_FUZZ_SECONDS sets the run's length (default 30)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PRUNED_CONFIGS, random_pruned

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
