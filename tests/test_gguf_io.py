"""The GGUF I/O module: the tokenizer section round-trips through a file, and the two readers of a
tokenizer (the GGUF section, the engine's tokenizers.Tokenizer) agree with the model directory's."""

import gguf
import pytest

from sparsamba import assets
from sparsamba.errors import SparsambaError
from sparsamba.gguf_io import GGUFTokenizer, load_gguf_tokenizer, open_gguf, write_gguf_atomically
from sparsamba.model.hf import load_tokenizer, read_config, resolve


def test_tokenizer_section_round_trips(tmp_path):
    d = resolve(assets.DEFAULT_MODEL)
    tok = GGUFTokenizer.from_model_dir(d, read_config(d), hf_json=True)
    assert tok.hf_json == (d / "tokenizer.json").read_text(encoding="utf-8")
    w = gguf.GGUFWriter(None, "test")
    tok.write(w)
    path = write_gguf_atomically(w, tmp_path / "t.gguf")
    _, kv, _ = open_gguf(path, "test file")
    assert GGUFTokenizer.from_gguf(kv) == tok
    text = "In the beginning God created the heaven and the earth."
    assert load_gguf_tokenizer(path).encode(text).ids == load_tokenizer(d).encode(text).ids


def test_a_file_without_a_tokenizer(tmp_path):
    w = gguf.GGUFWriter(None, "test")
    path = write_gguf_atomically(w, tmp_path / "none.gguf")
    _, kv, _ = open_gguf(path, "test file")
    assert GGUFTokenizer.from_gguf(kv) is None
    with pytest.raises(SparsambaError, match="holds no tokenizer"):
        load_gguf_tokenizer(path)
