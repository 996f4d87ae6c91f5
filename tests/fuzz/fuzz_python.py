"""Coverage-guided fuzzing (atheris) of the Python paths that read untrusted files: a safetensors
header (``load_model`` on a folder whose model.safetensors is the input) and a packed GGUF's
tokenizer (``load_gguf_tokenizer`` on the input as a file). Either must answer a bad file with a
``SparsambaError`` — any other exception is a crash that atheris reports with the input.

    python tests/fuzz/fuzz_python.py safetensors CORPUS_DIR -max_total_time=60
    python tests/fuzz/fuzz_python.py tokenizer CORPUS_DIR -max_total_time=60

(tests/test_fuzz.py makes the seed corpora and runs both briefly.)"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

# only our own code is instrumented for coverage: torch and friends would take minutes to instrument
with atheris.instrument_imports(include=["sparsamba"]):
    from sparsamba.errors import SparsambaError
    from sparsamba.gguf_io import load_gguf_tokenizer
    from sparsamba.model.hf import load_model

WORK = Path(tempfile.mkdtemp(prefix="sparsamba-fuzz-"))


def safetensors(data: bytes) -> None:
    """The model folder (config.json beside it, copied from the seed folder) with these weights."""
    (WORK / "model.safetensors").write_bytes(data)
    try:
        load_model(WORK)
    except SparsambaError:
        pass


def tokenizer(data: bytes) -> None:
    f = WORK / "m.gguf"
    f.write_bytes(data)
    try:
        load_gguf_tokenizer(f)
    except SparsambaError:
        pass


def main() -> None:
    target = sys.argv.pop(1)
    if target == "safetensors":
        # the config that goes with the seeds (SPARSAMBA_FUZZ_CONFIG: a config.json path)
        (WORK / "config.json").write_bytes(Path(os.environ["SPARSAMBA_FUZZ_CONFIG"]).read_bytes())
    atheris.Setup(sys.argv, {"safetensors": safetensors, "tokenizer": tokenizer}[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
