"""GGUF files in and out, for the exporter (llama.cpp's dense ``mamba`` / ``mamba2``) and the compiler
(the packed ``sparsamba.mamba``): opening a file, writing one atomically, and the tokenizer section.

Two tokenizers, two names: ``GGUFTokenizer`` is the tokenizer *section* of a GGUF (llama.cpp's
``tokenizer.ggml.*`` keys, built from a model directory or read back from a file), and
``load_gguf_tokenizer`` gives the ``tokenizers.Tokenizer`` that the compiler stored as text in a packed
file (``tokenizer.huggingface.json``), which the engine encodes and decodes with.
Torch is imported only by ``open_gguf`` (the engine reads its tokenizer without it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SparsambaError
from .outputs import write_file_atomically

# llama.cpp's name for a GPT-2 pre-tokenizer (GGUF key tokenizer.ggml.pre). Our tokenizers are
# tokenizers' ByteLevel(use_regex=True, add_prefix_space=False), which splits text with GPT-2's
# regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+); llama.cpp
# maps "gpt-2" to LLAMA_VOCAB_PRE_TYPE_GPT2, its implementation of that regex (its converter writes
# "gpt-2" for openai-community/gpt2). An unknown name is a load error in llama.cpp, and "default"
# would split differently: its default BPE pre-tokenizer cuts runs of punctuation and digits apart.
TOKENIZER_PRE = "gpt-2"
PAD_TOKEN = "[PAD{}]"  # placeholder rows past the tokenizer, as llama.cpp's converter names them


# ----------------------------------------------------------------------------------------------
# Files


def open_gguf(path: Path, what: str):
    """(reader, kv, tensors) of a GGUF: ``kv(key, required=True)`` reads a metadata value (a missing
    required key is an error saying the file is not a complete ``what``); ``tensors`` are torch
    copies out of the mmap, by name."""
    import gguf
    import torch

    try:
        r = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise SparsambaError(f"{path}: cannot read as GGUF ({e})") from None

    def kv(key: str, required: bool = True):
        f = r.fields.get(key)
        if f is None and required:
            raise SparsambaError(f"{path}: metadata key {key} is missing; not a complete {what}")
        return None if f is None else f.contents()

    return r, kv, {x.name: torch.from_numpy(np.array(x.data)) for x in r.tensors}


def write_gguf_atomically(w, out: Path) -> Path:
    """Write the filled ``gguf.GGUFWriter`` ``w`` to a temporary file beside ``out`` and rename it into
    place when complete, so a failure leaves nothing behind (and an old file untouched)."""

    def write(tmp: Path) -> None:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()

    return write_file_atomically(out, write)


# ----------------------------------------------------------------------------------------------
# The tokenizer section


def _read_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """tokenizer.json -> (tokens in id order padded to ``vocab_size``, their gguf token types, merges)."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise SparsambaError(
            f"{model_dir}: no tokenizer.json; a GGUF for llama.cpp carries its tokenizer, so add the model's "
            "tokenizer.json to the directory"
        )
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model, pre = tj["model"], tj.get("pre_tokenizer") or {}
        vocab = model["vocab"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SparsambaError(f"{path}: not a valid tokenizers file ({type(e).__name__}: {e})") from None
    if (
        model.get("type") != "BPE"
        or not isinstance(vocab, dict)
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space", False)
    ):
        raise SparsambaError(
            f"{path}: export-gguf writes GPT-2-style byte-level BPE tokenizers only (model BPE, pre-tokenizer "
            f"ByteLevel with its regex and no prefix space), this one is model {model.get('type')!r}, "
            f"pre-tokenizer {pre.get('type')!r}; llama.cpp would tokenize text differently"
        )

    T = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (tok, T.NORMAL) for tok, i in vocab.items()}
    for a in tj.get("added_tokens") or []:
        by_id[a["id"]] = (a["content"], T.CONTROL if a.get("special") else T.USER_DEFINED)
    top = max(by_id, default=-1)
    if top >= vocab_size:
        raise SparsambaError(
            f"{path}: the tokenizer has token id {top} but the model has {vocab_size} embedding rows; "
            "the tokenizer does not belong to this model"
        )
    tokens, types = [], []
    for i in range(vocab_size):  # llama.cpp needs one token per embedding row
        tok, ty = by_id.get(i, (PAD_TOKEN.format(i), T.UNUSED))
        tokens.append(tok)
        types.append(int(ty))

    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2 or any(" " in p for p in pair):
            # a byte-level vocabulary never holds a raw space; GGUF merges are "left right" strings
            raise SparsambaError(f"{path}: merge {m!r} is not a pair of byte-level tokens")
        merges.append(f"{pair[0]} {pair[1]}")
    return tokens, types, merges


def _add_bos_eos(model_dir: Path) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS itself (tokenizer_config.json); byte-level BPE adds neither."""
    p = model_dir / "tokenizer_config.json"
    try:
        tc = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        tc = {}
    return bool(tc.get("add_bos_token", False)), bool(tc.get("add_eos_token", False))


@dataclass
class GGUFTokenizer:
    """The tokenizer section of a GGUF: llama.cpp's ``tokenizer.ggml.*`` keys, and the HF tokenizer.json
    text (``tokenizer.huggingface.json``) where the file carries it."""

    tokens: list[str]  # one per embedding row
    types: list[int]  # gguf.TokenType of each
    merges: list[str]  # "left right"
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos: bool
    add_eos: bool
    hf_json: str | None = None

    @classmethod
    def from_model_dir(cls, model_dir: Path, cfg, hf_json: bool = False) -> GGUFTokenizer:
        """The section for ``model_dir`` (tokenizer.json, tokenizer_config.json, ids from ``cfg``); with
        ``hf_json`` it carries the tokenizer.json text too (the packed file does, for the engine)."""
        tokens, types, merges = _read_vocab(model_dir, cfg.vocab_size)
        add_bos, add_eos = _add_bos_eos(model_dir)
        ids = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}
        for what, tid in ids.items():
            if tid is not None and not 0 <= tid < len(tokens):
                raise SparsambaError(
                    f"{model_dir / 'config.json'}: {what}_token_id {tid} is outside the vocabulary"
                )
        text = (model_dir / "tokenizer.json").read_text(encoding="utf-8") if hf_json else None
        return cls(tokens, types, merges, ids["bos"], ids["eos"], ids["pad"], add_bos, add_eos, text)

    @classmethod
    def from_gguf(cls, kv) -> GGUFTokenizer | None:
        """The section of an open GGUF (``kv`` of ``open_gguf``), or None when the file has none."""
        if kv("tokenizer.ggml.tokens", required=False) is None:
            return None
        return cls(
            tokens=list(kv("tokenizer.ggml.tokens")),
            types=[int(x) for x in kv("tokenizer.ggml.token_type")],
            merges=list(kv("tokenizer.ggml.merges")),
            bos_token_id=kv("tokenizer.ggml.bos_token_id", required=False),
            eos_token_id=kv("tokenizer.ggml.eos_token_id", required=False),
            pad_token_id=kv("tokenizer.ggml.padding_token_id", required=False),
            add_bos=bool(kv("tokenizer.ggml.add_bos_token")),
            add_eos=bool(kv("tokenizer.ggml.add_eos_token")),
            hf_json=kv("tokenizer.huggingface.json", required=False),
        )

    def write(self, w) -> None:
        """Write the section into the ``gguf.GGUFWriter`` ``w``."""
        w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        w.add_tokenizer_pre(TOKENIZER_PRE)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        for add, tid in (
            (w.add_bos_token_id, self.bos_token_id),
            (w.add_eos_token_id, self.eos_token_id),
            (w.add_pad_token_id, self.pad_token_id),
        ):
            if tid is not None:
                add(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.hf_json is not None:
            w.add_string("tokenizer.huggingface.json", self.hf_json)


def load_gguf_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a packed GGUF's ``tokenizer.huggingface.json``."""
    import gguf
    from tokenizers import Tokenizer

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises assorted errors on bad files
        raise SparsambaError(f"{path}: cannot read the GGUF ({e})") from None
    field = reader.fields.get("tokenizer.huggingface.json")
    if field is None:
        raise SparsambaError(
            f"{path}: holds no tokenizer (tokenizer.huggingface.json); pass token ids instead"
        )
    try:
        return Tokenizer.from_str(bytes(field.parts[field.data[0]]).decode())
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for bad JSON
        raise SparsambaError(
            f"{path}: its tokenizer (tokenizer.huggingface.json) is corrupt ({e}); compile the model again, "
            "or pass token ids with --tokens"
        ) from None


def gguf_eos_token_id(path: str | Path) -> int | None:
    """The end-of-text token id a GGUF's tokenizer section states, or None."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.eos_token_id")
        return None if field is None else int(field.contents())
    except Exception as e:  # the gguf package raises assorted errors on bad files
        raise SparsambaError(f"{path}: cannot read the GGUF ({e})") from None
