"""libsparsamba as an app sees it: one version (pyproject.toml, sparsamba.__version__, sparsamba.h's
macros, sb_version()), only the header's sb_* functions exported (and every one declared for ctypes in
runtime/lib.py), the run-time header check, and `cmake --install` giving a prefix that
examples/generate.c builds against: under ASan with LeakSanitizer it runs clean on the embedded model,
prints the text of `sparsamba run`, and fails with one line on bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_engine_files import good  # noqa: F401 - a packed file with no tokenizer

import sparsamba
from sparsamba.runtime.lib import PROTOTYPES, error_buffer, library

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "src" / "engine" / "sparsamba.h"
EMBEDDED = ROOT / "src" / "sparsamba" / "assets" / "kjv-mamba-tiny"
PROMPT, N = "And God said", 24


def header_macro(name: str) -> int:
    return int(re.search(rf"^#define {name} (\d+)$", HEADER.read_text(), re.M).group(1))


def header_api() -> set[str]:
    """every function the header marks SB_API"""
    return set(re.findall(r"^SB_API\b[^;(]*?\b(sb_\w+)\s*\(", HEADER.read_text(), re.M))


def test_one_version_everywhere():
    pyproject = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    header = ".".join(str(header_macro(f"SB_VERSION_{p}")) for p in ("MAJOR", "MINOR", "PATCH"))
    lib = library()
    assert pyproject == sparsamba.__version__ == header == lib.sb_version().decode()
    assert lib.sb_abi_version() == header_macro("SB_ABI_VERSION")


def test_a_version_mismatch_stops_the_configure(tmp_path):
    """CMake reads pyproject.toml's version and refuses a header that says otherwise"""
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed (pip install cmake)"
    (tmp_path / "src" / "engine").mkdir(parents=True)
    (tmp_path / "src" / "engine" / "sparsamba.h").write_text(HEADER.read_text())
    (tmp_path / "CMakeLists.txt").write_text((ROOT / "CMakeLists.txt").read_text())
    text = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(
        text.replace(f'version = "{sparsamba.__version__}"', 'version = "9.8.7"')
    )
    p = subprocess.run(
        [cmake, "-S", str(tmp_path), "-B", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert p.returncode != 0 and "('9.8.7')" in p.stderr and "must agree" in p.stderr, p.stderr


def test_the_library_exports_the_api_and_nothing_else():
    nm = shutil.which("nm")
    if not nm:
        pytest.skip("nm (binutils) not found")
    out = subprocess.run(
        [nm, "-D", "--defined-only", library()._name], capture_output=True, text=True, check=True
    )
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.split()[-2:-1] in (["T"], ["W"])}
    api = header_api()
    assert len(api) > 30
    assert exported == api, (
        f"exported but not in the header: {exported - api}; not exported: {api - exported}"
    )
    assert set(PROTOTYPES) == api, (
        f"no ctypes prototype: {api - set(PROTOTYPES)}; stale: {set(PROTOTYPES) - api}"
    )


def test_the_header_check_at_run_time():
    lib, err = library(), error_buffer()
    abi, major, minor = (header_macro(f"SB_{k}") for k in ("ABI_VERSION", "VERSION_MAJOR", "VERSION_MINOR"))
    assert lib.sb_check_version(abi, major, minor, err, len(err)) == 0
    assert (
        lib.sb_check_version(abi, major, max(minor - 1, 0), err, len(err)) == 0
    )  # an older header is served
    assert lib.sb_check_version(abi + 1, major, minor, err, len(err)) == 4
    assert f"ABI {abi + 1}" in err.value.decode() and "rebuild the app" in err.value.decode()
    assert lib.sb_check_version(abi, major, minor + 1, err, len(err)) == 4
    assert "at least as new as the header" in err.value.decode()


# ----------------------------------------------------------------------------------------------
# the installed prefix and the example, under the sanitizers


SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    """libsparsamba (ASan + UBSan) built standalone and installed by `cmake --install`."""
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed (pip install cmake)"
    build, prefix = tmp_path_factory.mktemp("lib-build"), tmp_path_factory.mktemp("prefix")
    cfg = [cmake, "-S", str(ROOT), "-B", str(build), "-DSPARSAMBA_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug"]
    subprocess.run([*cfg, f"-DCMAKE_INSTALL_PREFIX={prefix}"], check=True, capture_output=True)
    for step in (
        ["--build", str(build), "--target", "sparsamba", "sparsamba-run", "-j2"],
        ["--install", str(build)],
    ):
        p = subprocess.run([cmake, *step], capture_output=True, text=True)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return prefix


def libdir(prefix: Path) -> Path:
    return next(prefix.glob("lib*/libsparsamba.so")).parent  # lib, lib64 or lib/<multiarch>


def build_app(prefix: Path, source: Path, out: Path) -> Path:
    """an app built against the prefix only, with the sanitizers (as the library was)"""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    lib = libdir(prefix)
    cmd = [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-g", *SAN, str(source), "-o", str(out)]
    pkg = shutil.which("pkg-config")
    if pkg:  # the installed sparsamba.pc, as the docs build an app
        env = dict(os.environ, PKG_CONFIG_PATH=str(lib / "pkgconfig"))
        flags = subprocess.run(
            [pkg, "--cflags", "--libs", "sparsamba"], capture_output=True, text=True, env=env
        )
        assert flags.returncode == 0, flags.stderr
        cmd += flags.stdout.split()
    else:
        cmd += [f"-I{prefix / 'include'}", f"-L{lib}", "-lsparsamba"]
    cmd.append(f"-Wl,-rpath,{lib}")
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def run_app(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1", OMP_NUM_THREADS="1"
    )
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def embedded_gguf(tmp_path_factory) -> Path:
    from sparsamba.compile import compile_model

    return compile_model(EMBEDDED, tmp_path_factory.mktemp("emb") / "m.gguf", dtype="f16").path


def test_the_docs_show_the_example_as_it_is():
    doc = (ROOT / "docs" / "mobile.md").read_text(encoding="utf-8")
    assert "```c\n" + (ROOT / "examples" / "generate.c").read_text() + "```" in doc


def test_the_installed_prefix(prefix):
    lib = libdir(prefix)
    v = sparsamba.__version__
    assert (lib / f"libsparsamba.so.{v}").is_file() and (lib / "libsparsamba.so").is_symlink()
    assert (prefix / "include" / "sparsamba.h").read_text() == HEADER.read_text()
    assert (prefix / "bin" / "sparsamba-run").is_file()
    pc = (lib / "pkgconfig" / "sparsamba.pc").read_text()
    assert f"Version: {v}" in pc and "-lsparsamba" in pc
    readelf = shutil.which("readelf")
    if readelf:
        d = subprocess.run(
            [readelf, "-d", str(lib / "libsparsamba.so")], capture_output=True, text=True
        ).stdout
        assert f"[libsparsamba.so.{header_macro('SB_ABI_VERSION')}]" in d, d


@pytest.fixture(scope="module")
def example(prefix, tmp_path_factory) -> Path:
    return build_app(prefix, ROOT / "examples" / "generate.c", tmp_path_factory.mktemp("app") / "generate")


def test_the_example_runs_clean_and_matches_python(example, embedded_gguf):
    p = run_app(example, str(embedded_gguf), PROMPT, str(N))
    assert p.returncode == 0 and "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr[
        -3000:
    ]
    py = subprocess.run(
        [sys.executable, "-m", "sparsamba", "run", str(embedded_gguf), "--prompt", PROMPT, "-n", str(N)]
        + ["--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert p.stdout == py.stdout and len(p.stdout) > len(PROMPT) + 20


def test_leaks_would_be_caught(prefix, embedded_gguf, tmp_path):
    """the same build catches a model never freed: the clean run above is a real check"""
    src = tmp_path / "leak.c"
    src.write_text(
        '#include "sparsamba.h"\n'
        "int main(int argc, char **argv) {\n"
        "    sb_model *m; char err[256]; int rc = 0; (void)argc;\n"
        "    for (int i = 0; i < 3; i++) rc |= sb_model_load(argv[1], &m, err, sizeof err);\n"
        "    return rc;  /* the first two models are unreachable */\n"
        "}\n"
    )
    p = run_app(build_app(prefix, src, tmp_path / "leak"), str(embedded_gguf))
    assert p.returncode != 0 and "LeakSanitizer: detected memory leaks" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/model.gguf", "x"], "/nonexistent/model.gguf: cannot open"),
        (["MODEL", ""], "the prompt is empty"),
        (["MODEL", "x", "0"], "N must be a whole number"),
        (["MODEL", "x", "2x"], "N must be a whole number"),
        (["MODEL"], "usage:"),
        (["NO_TOKENIZER", "x"], "this model has no tokenizer"),
    ],
)
def test_the_example_bad_input(example, embedded_gguf, good, args, message):  # noqa: F811
    model = {"MODEL": str(embedded_gguf), "NO_TOKENIZER": str(good)}
    p = run_app(example, *[model.get(a, a) for a in args])
    assert p.returncode == 1 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr
