"""bench/speed.py's roofline counts the recurrent state a decoded token reads and writes: the same bytes
from an HF directory, our packed GGUF and llama.cpp's GGUF of one model, Mamba-1 and Mamba-2 (several
groups, a conv width other than 4), equal to the state the engine actually allocates."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import random_mamba2, random_pruned

from sparsamba import assets
from sparsamba.compile import compile_model
from sparsamba.export.llamacpp import export_gguf
from sparsamba.model.hf import read_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import machine  # noqa: E402


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_state_bytes_agree_across_files(tmp_path, arch):
    if arch == "mamba1":
        src = random_pruned(tmp_path / "m", seed=3, vocab=4096, hidden_size=40, state_size=12, conv_kernel=3)
    else:
        src = random_mamba2(
            tmp_path / "m", seed=3, pruned=True, vocab=4096, hidden_size=30, num_heads=12, head_dim=5, n_groups=3,
            state_size=7, conv_kernel=3,
        )  # fmt: skip
    for f in assets.DEFAULT_MODEL.glob("tokenizer*.json"):  # llama.cpp's GGUF carries a tokenizer
        shutil.copy(f, Path(src) / f.name)
    c = read_config(src)
    di = c.intermediate_size
    conv = c.conv_dim if arch == "mamba2" else di
    # by hand: fp32, read + write, per layer the SSM state (di × N) and the conv window (K - 1 columns)
    want = 2 * 4 * c.num_hidden_layers * (di * c.state_size + conv * (c.conv_kernel - 1))
    packed = compile_model(src, tmp_path / "m.gguf", dtype="f16").path
    llama = export_gguf(src, tmp_path / "llama.gguf", dtype="f16")
    assert machine.hf_state_bytes(Path(src)) == want
    assert machine.gguf_state_bytes(packed) == want
    assert machine.gguf_state_bytes(llama) == want
