"""Text from local files -> token ids -> the fixed windows used for calibration and perplexity.

Accepted inputs: a UTF-8 text file (``.txt``, or anything not ``.jsonl``), the same gzip-compressed
(``.gz``), JSON lines with a ``"text"`` field (``.jsonl`` / ``.jsonl.gz``), or a folder of such files
(read in sorted order, joined by blank lines).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from ..errors import SparsambaError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".gz"}


def _read_one(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem_suffix == ".jsonl":
                parts = []
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        parts.append(row["text"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise SparsambaError(
                            f'{path}:{i}: not a JSON object with a "text" field ({e}); '
                            'give one JSON object per line, like {"text": "..."}'
                        ) from None
                return "\n\n".join(parts)
            return f.read()
    except UnicodeDecodeError as e:
        raise SparsambaError(f"{path}: not UTF-8 text ({e}); give a UTF-8 .txt, .jsonl or .gz file") from None
    except (OSError, EOFError) as e:
        raise SparsambaError(f"{path}: cannot read it ({e})") from None


def read_text(path: str | Path) -> str:
    """The text of a file or of a folder of text files; an error if it is missing or empty."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise SparsambaError(f"{path}: folder holds no .txt, .jsonl or .gz files")
        text = "\n\n".join(_read_one(p) for p in files)
    elif path.is_file():
        text = _read_one(path)
    else:
        raise SparsambaError(f"{path}: no such file or folder")
    if not text.strip():
        raise SparsambaError(f"{path}: the data is empty; give a file with text in it")
    return text


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """All of ``text`` as one stream of token ids, (n_tokens,) int64.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or anything with ``encode(str) -> list[int]``
    (a transformers tokenizer)."""
    enc = tokenizer.encode(text)
    ids = enc.ids if hasattr(enc, "ids") else enc
    return torch.tensor(ids, dtype=torch.long)


def _need(tokens: torch.Tensor, seqlen: int, what: str, source: str) -> None:
    if seqlen < 2:
        raise SparsambaError(f"window length {seqlen} is too short for {what}; use at least 2 tokens")
    if tokens.numel() < seqlen:
        raise SparsambaError(
            f"{source}: {tokens.numel()} tokens, fewer than one window of {seqlen} for {what}; "
            "give more text or a shorter window (--seqlen)"
        )


def calibration_windows(
    tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0, source: str = "data"
) -> torch.Tensor:
    """(n_samples, seqlen) windows at random offsets, as SparseGPT / Wanda draw their calibration
    set; the same seed gives the same windows."""
    _need(tokens, seqlen, "calibration", source)
    if n_samples < 1:
        raise SparsambaError(f"number of calibration samples must be at least 1, got {n_samples}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (n_samples,), generator=g)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def eval_windows(
    tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, source: str = "data"
) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows from the start, the tail that does not fill one dropped
    (the perplexity protocol of SparseGPT / Wanda)."""
    _need(tokens, seqlen, "evaluation", source)
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seqlen].view(n, seqlen)
