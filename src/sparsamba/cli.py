"""The ``sparsamba`` command. Every subcommand is a thin shell over a library function; a
``SparsambaError`` prints as one line and exits 1 (the traceback only with ``--debug``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import SparsambaError

DEFAULT_PROMPT = "In the beginning"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(model: str | None):
    import torch

    from . import assets
    from .model.hf import load_model, load_tokenizer

    torch.set_flush_denormal(True)  # decays of the scan drift into denormals, slow on x86
    path = model or assets.DEFAULT_MODEL
    m = load_model(path)
    tok = load_tokenizer(path)
    return path, m, tok


def _need_tokenizer(tok, model) -> None:
    if tok is None:
        raise SparsambaError(
            f"{model}: no tokenizer.json in the model directory; add the model's tokenizer.json"
        )


def _eval_text(model_path, m, tok, data: str | None, seqlen: int, max_windows: int | None, batch_size: int):
    from . import assets
    from .data import eval_windows, read_text, tokenize
    from .evaluate import perplexity

    _need_tokenizer(tok, model_path)
    data = data or assets.HELDOUT
    ids = tokenize(read_text(data), tok)
    windows = eval_windows(ids, seqlen, max_windows, source=str(data))
    return data, perplexity(m, windows, batch_size=batch_size, progress=sys.stderr.isatty())


def cmd_eval(a) -> None:
    path, m, tok = _load(a.model)
    data, r = _eval_text(path, m, tok, a.data, a.seqlen, a.max_windows, a.batch_size)
    print(f"model       {path}")
    print(f"data        {data}")
    print(f"perplexity  {r.perplexity:.3f}")
    print(f"nll         {r.nll:.4f} nats/token")
    print(f"tokens      {r.tokens} predicted in {r.windows} windows of {r.seqlen}")
    print(f"time        {r.seconds:.1f} s ({r.tokens / max(r.seconds, 1e-9):.0f} tokens/s)")


def _generate_text(m, tok, prompt: str, n: int, temperature: float, seed: int) -> str:
    from .generate import generate

    ids = tok.encode(prompt).ids
    out = generate(m, ids, n, temperature=temperature, seed=seed, eos_token_id=m.config.eos_token_id)
    return tok.decode(out)


def cmd_generate(a) -> None:
    path, m, tok = _load(a.model)
    _need_tokenizer(tok, path)
    t0 = time.time()
    text = _generate_text(m, tok, a.prompt, a.n, a.temperature, a.seed)
    print(a.prompt + text)
    _log(f"{a.n} tokens in {time.time() - t0:.2f} s (torch reference)")


def cmd_demo(a) -> None:
    """The main job on the embedded model, end to end (grows with the pipeline)."""
    from . import assets

    t0 = time.time()
    path, m, tok = _load(None)
    n_params = sum(p.numel() for p in m.parameters())
    print(
        f"model       {assets.DEFAULT_MODEL.name}: Mamba-1, {n_params / 1e6:.2f}M parameters, "
        f"{m.config.num_hidden_layers} layers, d_model {m.config.hidden_size}"
    )
    data, r = _eval_text(path, m, tok, None, a.seqlen, a.max_windows, 8)
    print(f"perplexity  {r.perplexity:.2f} on {Path(data).name} ({r.tokens} tokens, {r.seconds:.1f} s)")
    text = _generate_text(m, tok, DEFAULT_PROMPT, a.n, 0.0, 0)
    print(f"generate    {DEFAULT_PROMPT}{text}")
    print(f"done in {time.time() - t0:.1f} s")


def cmd_train_tiny(a) -> None:
    from . import assets
    from .train import TrainConfig, train_tiny

    tc = TrainConfig(steps=a.steps, seed=a.seed, threads=a.threads)
    train_tiny(a.data or assets.KJV_TEXT, a.output, tc, overwrite=a.overwrite, log=_log)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsamba", description="Prune, compile and run Mamba language models.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="evaluate and generate with the embedded default model")
    s.add_argument("--seqlen", type=int, default=256)
    s.add_argument("--max-windows", type=int, default=None)
    s.add_argument("-n", type=int, default=24, help="tokens to generate")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("eval", help="perplexity of a model on held-out text")
    s.add_argument("model", nargs="?", help="model directory or hub id (default: the embedded model)")
    s.add_argument("--data", help="text / .jsonl / .gz file or folder (default: the embedded held-out split)")
    s.add_argument("--seqlen", type=int, default=256, help="window length in tokens")
    s.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    s.add_argument("--batch-size", type=int, default=8)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="generate text with the torch reference")
    s.add_argument("model", nargs="?", help="model directory or hub id (default: the embedded model)")
    s.add_argument("--prompt", default=DEFAULT_PROMPT)
    s.add_argument("-n", type=int, default=32, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("train-tiny", help="train the embedded model again from its text splits")
    s.add_argument("-o", "--output", required=True)
    s.add_argument(
        "--data", help="folder with train.txt[.gz] and heldout.txt (default: the shipped KJV splits)"
    )
    s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_train_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SparsambaError as e:
        if args.debug:
            raise
        print(f"sparsamba {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
