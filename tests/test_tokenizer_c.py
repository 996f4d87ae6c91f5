"""The engine's C tokenizer (src/engine/tokenizer.c) against HF ``tokenizers``: identical ids on a corpus
(held-out KJV text, unicode, invalid UTF-8, digits, whitespace runs, added tokens) for the embedded
model's tokenizer and for a GPT-NeoX-style one with a large merge list trained here; decode(encode(text))
== text; the streaming decoder; sparsamba-run's text mode against ``sparsamba run``; bad input."""

from __future__ import annotations

import ctypes
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
from test_engine_files import asan_run, good, sanitized  # noqa: E402, F401 - the sanitizer build, a file with no tokenizer
from tokenizers import Tokenizer  # noqa: E402

from sparsamba.runtime.lib import error_buffer, library, standalone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "src" / "sparsamba" / "assets" / "kjv-mamba-tiny"
KJV = ROOT / "src" / "sparsamba" / "assets" / "kjv-text"

UNICODE = [
    "café naïve résumé Ångström façade",
    "e\u0301 a\u0308 n\u0303 combining marks \u0301\u0301 alone",
    "中文字符和日本語のテキスト、한국어 텍스트。",
    "emoji 👋🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️ and more😀😀",
    "Ελληνικά кириллица עברית العربية हिन्दी ไทย",
    "math ∑∫√∞ ≠ ≤ ≥ ½ ¾ ² ³ ⅷ Ⅻ ٣٤ ߁",
    "\u00a0nbsp\u2003em\u3000ideo\u2028ls\u2029ps\u0085nel\x1cfs\x1dgs \u200bzw\u180emvs",
]
ASCII = [
    "",
    " ",
    "a",
    "In the beginning God created the heaven and the earth.",
    "1234567890 3.14159 1,000,000 2024-01-01 0x1F 007",
    "   leading spaces, trailing spaces   ",
    "tabs\there\t\tand\t\t\tthere\n\nnewlines\n\n\n\r\nCRLF\r\n",
    "many     spaces      between\n    indented\n\tline   \n",
    "it's don't I'm we're they've you'll he'd IT'S 's 't 're 've 'm 'll 'd '' ' x'",
    "punctuation!!! ??? ... --- ((( ))) [[ ]] {{ }} @#$%^&*_+=|\\/<>~`",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> <|endoftext|><|endoftext|>x<|endoftext",
    "x" * 3000,
    "ab " * 500,
    " \n \n  \n\t \t",
]
INVALID = [
    b"\xff\xfe invalid lead bytes \x80\xbf",
    b"truncated \xe4\xb8 and \xf0\x9f\x98 end \xe2",
    b"overlong \xc0\xaf \xe0\x80\xaf surrogate \xed\xa0\x80 too big \xf4\x90\x80\x80 \xf5",
    b"mixed \xce\xbb\xff\xce\xbb \xe2\x82\xac\x80",
]


def corpus() -> list[bytes]:
    """texts as bytes; the held-out text in chapter-sized pieces and whole"""
    held = (KJV / "heldout.txt").read_text(encoding="utf-8")
    chapters = held.split("\n\n")
    out = [t.encode() for t in ASCII + UNICODE] + INVALID
    out += [c.encode() for c in chapters[:20]]
    out.append(held.encode())
    return out


# ----------------------------------------------------------------------------------------------
# ctypes helpers


class CTok:
    def __init__(self, gguf: Path):
        self.lib = library()
        err = error_buffer()
        self.m, self.t = ctypes.c_void_p(), ctypes.c_void_p()
        assert self.lib.sb_model_load(str(gguf).encode(), ctypes.byref(self.m), err, len(err)) == 0, err.value
        rc = self.lib.sb_tokenizer_load(self.m, ctypes.byref(self.t), err, len(err))
        assert rc == 0, err.value

    def close(self):
        self.lib.sb_tokenizer_free(self.t)
        self.lib.sb_model_free(self.m)

    def encode(self, b: bytes) -> list[int]:
        cap = 6 * len(b) + 1
        ids, n, err = (ctypes.c_int32 * cap)(), ctypes.c_int32(), error_buffer()
        assert self.lib.sb_tokenize(self.t, b, len(b), ids, cap, ctypes.byref(n), err, len(err)) == 0, (
            err.value
        )
        return list(ids[: n.value])

    def decode(self, ids: list[int]) -> bytes:
        arr = (ctypes.c_int32 * max(len(ids), 1))(*ids)
        n = ctypes.c_size_t()
        err = error_buffer()
        rc = self.lib.sb_detokenize(self.t, arr, len(ids), None, 0, ctypes.byref(n), err, len(err))
        assert rc in (0, 4)
        out = ctypes.create_string_buffer(n.value + 1)
        rc = self.lib.sb_detokenize(self.t, arr, len(ids), out, len(out), ctypes.byref(n), err, len(err))
        assert rc == 0, err.value
        return out.raw[: n.value]

    def stream(self, ids: list[int]) -> list[bytes]:
        s, err = ctypes.c_void_p(), error_buffer()
        assert self.lib.sb_stream_new(self.t, ctypes.byref(s), err, len(err)) == 0
        text, n, pieces = ctypes.c_char_p(), ctypes.c_size_t(), []
        for i in ids:
            assert self.lib.sb_stream_push(s, i, ctypes.byref(text), ctypes.byref(n), err, len(err)) == 0
            pieces.append(ctypes.string_at(text, n.value))
        rest = ctypes.create_string_buffer(4)
        n_rest = self.lib.sb_stream_flush(s, rest)
        pieces.append(rest.raw[:n_rest])
        self.lib.sb_stream_free(s)
        return pieces


def check_parity(hf: Tokenizer, c: CTok) -> tuple[int, int]:
    texts, tokens = 0, 0
    for b in corpus():
        text = b.decode("utf-8", errors="replace")  # how a Python caller hands tokenizers these bytes
        want = hf.encode(text).ids
        got = c.encode(b)
        assert got == want, (
            f"{text[:80]!r}: first difference at {next(i for i, (x, y) in enumerate(zip(got + [-1], want + [-1])) if x != y)}"
        )
        back = c.decode(got)
        assert back == hf.decode(want).encode(), text[:80]
        if "<|" not in text:  # special tokens decode to nothing, as in tokenizers' decode
            assert back == text.encode(), text[:80]  # decode(encode(text)) == text
        pieces = c.stream(got)
        assert b"".join(pieces) == back
        for p in pieces:
            p.decode("utf-8")  # every streamed piece is whole characters
        texts += 1
        tokens += len(got)
    return texts, tokens


# ----------------------------------------------------------------------------------------------
# models


@pytest.fixture(scope="module")
def embedded_gguf(tmp_path_factory):
    from sparsamba.compile import compile_model

    return compile_model(EMBEDDED, tmp_path_factory.mktemp("emb") / "m.gguf", dtype="f32").path


@pytest.fixture(scope="module")
def neox_gguf(tmp_path_factory):
    """A random small Mamba saved with a GPT-NeoX-style byte-level BPE of 8000 tokens trained on the KJV
    train text (7700+ merges), special tokens and NeoX's non-special whitespace-run tokens, compiled."""
    import torch
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

    from sparsamba.compile import compile_model
    from sparsamba.model.hf import save_model
    from sparsamba.model.mamba1 import Mamba1Config, Mamba1LM

    root = tmp_path_factory.mktemp("neox")
    text = gzip.decompress((KJV / "train.txt.gz").read_bytes()).decode()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n")[:600], trainer=trainer)
    # GPT-NeoX's tokenizer has runs of spaces as added (non-special) tokens
    tok.add_tokens([AddedToken(" " * k, normalized=False) for k in (2, 4, 8)])
    tok.add_special_tokens(["<|sep|>"])
    d = root / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    torch.manual_seed(0)
    m = Mamba1LM(
        Mamba1Config(
            vocab_size=tok.get_vocab_size() + 3,
            hidden_size=16,
            num_hidden_layers=1,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    )
    model_dir = save_model(m, root / "model", tokenizer_dir=d)
    return compile_model(model_dir, root / "neox.gguf", dtype="f32").path, d / "tokenizer.json"


def test_embedded_tokenizer_ids_match_tokenizers(embedded_gguf):
    c = CTok(embedded_gguf)
    try:
        texts, tokens = check_parity(Tokenizer.from_file(str(EMBEDDED / "tokenizer.json")), c)
    finally:
        c.close()
    print(f"embedded: ids identical on {texts} texts / {tokens} tokens")
    assert tokens > 40000


def test_neox_style_tokenizer_ids_match_tokenizers(neox_gguf):
    path, tj = neox_gguf
    assert len(json.loads(tj.read_text())["model"]["merges"]) > 7000
    c = CTok(path)
    try:
        texts, tokens = check_parity(Tokenizer.from_file(str(tj)), c)
        # the added tokens: NeoX's space runs (longest first) and a special token, mid-word too
        hf = Tokenizer.from_file(str(tj))
        for s in ["a" + " " * k + "b" for k in range(1, 20)] + [
            "x<|sep|>y<|padding|>",
            "  \n    \n        end",
        ]:
            assert c.encode(s.encode()) == hf.encode(s).ids, repr(s)
    finally:
        c.close()
    print(f"neox-style: ids identical on {texts} texts / {tokens} tokens")


def test_streaming_holds_back_split_characters(embedded_gguf):
    """an emoji made of byte tokens: nothing shown until it is whole; a character cut off at the end
    comes out of the flush as one U+FFFD"""
    c = CTok(embedded_gguf)
    try:
        emoji = "😀".encode()
        ids = c.encode(emoji)
        assert len(ids) > 1  # the small vocabulary has no emoji: byte tokens
        pieces = c.stream(ids)
        assert pieces[:-1] == [b""] * (len(ids) - 1) + [emoji] and pieces[-1] == b""
        cut = c.stream(c.encode(b"a" + emoji)[:-1])
        assert b"".join(cut) == "a\ufffd".encode() and cut[-1] == "\ufffd".encode()
    finally:
        c.close()


def test_no_tokenizer_and_bad_ids(tmp_path):
    """a GGUF without tokenizer keys: the clear error; ids outside the vocabulary: SB_ERR_ARG"""
    from conftest import random_pruned

    from sparsamba.compile import compile_model

    d = random_pruned(tmp_path / "m", seed=1, hidden_size=16)
    path = compile_model(d, tmp_path / "m.gguf", dtype="f32").path
    lib, err = library(), error_buffer()
    m, t = ctypes.c_void_p(), ctypes.c_void_p()
    assert lib.sb_model_load(str(path).encode(), ctypes.byref(m), err, len(err)) == 0
    assert lib.sb_tokenizer_load(m, ctypes.byref(t), err, len(err)) == 4
    assert b"this model has no tokenizer" in err.value
    lib.sb_model_free(m)
    p = subprocess.run([str(standalone()), str(path), "-p", "hello"], capture_output=True, text=True)
    assert p.returncode == 1 and "this model has no tokenizer" in p.stderr and "--tokens" in p.stderr


# ----------------------------------------------------------------------------------------------
# sparsamba-run's text mode


PROMPTS = [
    "In the beginning",
    "And the LORD spake unto Moses, saying,",
    "Blessed are the",
    "καὶ 中文 😀 ünïcode",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sparsamba_run_text_matches_python_run(embedded_gguf, prompt):
    """greedy text of the C program == `sparsamba run`'s (the HF tokenizer and the Python sampler);
    the Python path does not stop at EOS, so neither does the C one here"""
    py = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsamba",
            "run",
            str(embedded_gguf),
            "--prompt",
            prompt,
            "-n",
            "64",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    c = subprocess.run(
        [str(standalone()), "-m", str(embedded_gguf), "-p", prompt, "-n", "64", "-t", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert c.stdout == py.stdout
    assert "tokens per second" in c.stderr and "peak RSS" in c.stderr


def test_sparsamba_run_sampling_and_stop(embedded_gguf):
    run = [str(standalone()), str(embedded_gguf), "-p", "In the beginning", "-n", "40", "-t", "1"]
    a = subprocess.run(
        [*run, "--temp", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "7"],
        capture_output=True,
        text=True,
        check=True,
    )
    b = subprocess.run(
        [*run, "--temp", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "7"],
        capture_output=True,
        text=True,
        check=True,
    )
    other = subprocess.run([*run, "--temp", "0.8", "--seed", "8"], capture_output=True, text=True, check=True)
    assert a.stdout == b.stdout and a.stdout != other.stdout
    greedy = subprocess.run([*run, "--ignore-eos"], capture_output=True, text=True, check=True).stdout
    stop = greedy[len("In the beginning") + 8 : len("In the beginning") + 10]
    s = subprocess.run([*run, "--ignore-eos", "--stop", stop], capture_output=True, text=True, check=True)
    assert s.stdout.rstrip("\n").endswith(stop) or stop in s.stdout
    assert len(s.stdout) < len(greedy) and "stop string" in s.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", ""], "the prompt is empty"),
        (["-p", "x", "-n", "0"], "-n must be"),
        (["-p", "x", "-n", "-3"], "-n must be"),
        (["-p", "x", "--temp", "nan"], "--temp must be"),
        (["-p", "x", "--top-p", "0"], "--top-p must be"),
        (["-p", "x", "-f", "/nonexistent"], "not both"),
        (["-f", "/nonexistent/prompt.txt"], "cannot open the prompt file"),
    ],
)
def test_sparsamba_run_bad_input(embedded_gguf, args, message):
    p = subprocess.run([str(standalone()), str(embedded_gguf), *args], capture_output=True, text=True)
    assert p.returncode == 1 and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_sparsamba_run_refuses_invalid_utf8(embedded_gguf):
    p = subprocess.run([str(standalone()), str(embedded_gguf), "-p", b"ok \xff bad"], capture_output=True)
    assert p.returncode == 1 and b"not valid UTF-8 (byte 0xff at offset 3)" in p.stderr


def test_text_mode_under_the_sanitizers(embedded_gguf, asan_run, good, tmp_path):  # noqa: F811
    """the new code (tokenizer, sampler, streaming, the program's text mode and its errors) under ASan
    + UBSan, leaks included: a long prompt file, sampling with a stop string, each bad input"""
    long_prompt = tmp_path / "p.txt"
    long_prompt.write_text((KJV / "heldout.txt").read_text(encoding="utf-8")[:20000] + " 😀 é 中")
    ok = sanitized(asan_run, embedded_gguf, "-f", str(long_prompt), "-t", "1")
    assert ok.returncode == 0, ok.stderr
    s = sanitized(
        asan_run,
        embedded_gguf,
        "-p",
        "In the",
        "--temp",
        "0.7",
        "--top-k",
        "5",
        "--top-p",
        "0.8",
        "--stop",
        "e",
        "-t",
        "1",
    )
    assert s.returncode == 0, s.stderr
    for args, msg in [
        (["-p", ""], "the prompt is empty"),
        (["-p", "ab\udcffc"], "not valid UTF-8"),
        (["-f", str(tmp_path / "none.txt")], "cannot open the prompt file"),
    ]:
        p = sanitized(asan_run, embedded_gguf, *args)
        assert p.returncode == 1 and msg in p.stderr, p.stderr
    p = sanitized(asan_run, good, "-p", "hello")
    assert p.returncode == 1 and "this model has no tokenizer" in p.stderr and "pass --tokens" in p.stderr
