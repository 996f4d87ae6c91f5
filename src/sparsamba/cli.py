"""The ``sparsamba`` command. Every subcommand is a thin shell over a library function; a
``SparsambaError`` (or an OS error such as a full disk) prints as one line and exits 1 (the
traceback only with ``--debug``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__, formats
from .errors import SparsambaError
from .outputs import check_output

DEFAULT_PROMPT = "In the beginning"
# below this many parameters a torch forward is a stream of small ops: a second thread costs more in
# waiting at each op's end than it saves, and when another process holds a core that wait becomes a
# scheduler time slice per op (measured: the embedded model's eval 30 s on 1 thread, 38 s on 2)
SMALL_TORCH_MODEL = 20_000_000


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _torch_threads(a, model=None) -> int:
    """Set torch's threads from --threads, or pick them for ``model``: 1 for a small model, else
    every core this process may use. Returns the count."""
    import torch

    from .runtime.engine import check_threads

    n = getattr(a, "threads", None)
    if n is not None:
        check_threads(n)
    elif model is not None and sum(p.numel() for p in model.parameters()) < SMALL_TORCH_MODEL:
        n = 1
    else:
        n = _cores()
    torch.set_num_threads(n)
    return n


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(model: str | None):
    import torch

    from . import assets
    from .model.hf import load_any, load_tokenizer

    torch.set_flush_denormal(True)  # decays of the scan drift into denormals, slow on x86
    path = model or assets.DEFAULT_MODEL
    m = load_any(path)
    tok = load_tokenizer(path)
    return path, m, tok


def _packed_model(model: str | None, a=None) -> Path:
    """A packed GGUF to run: the one given (a folder is pointed to ``compile``), or the embedded model
    compiled once into the user's cache (``SPARSAMBA_CACHE``, else ~/.cache/sparsamba)."""
    if model is not None:
        p = Path(model)
        if p.is_dir():
            raise SparsambaError(
                f"{p}: is a model folder, not a packed model; compile it first: "
                f"sparsamba compile {p} -o {p.name}.gguf, then give {p.name}.gguf"
            )
        return p
    from . import assets
    from .compile import compile_model
    from .compile.packed_gguf import FORMAT_VERSION

    cache = Path(
        os.environ.get("SPARSAMBA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsamba"
    )
    out = cache / f"{assets.DEFAULT_MODEL.name}-{__version__}-v{FORMAT_VERSION}-f16.gguf"
    if not out.is_file():
        _log(f"compiling the embedded model once into {out}")
        compile_model(assets.DEFAULT_MODEL, out, dtype="f16")
    return out


def _need_tokenizer(tok, model) -> None:
    if tok is None:
        raise SparsambaError(
            f"{model}: no tokenizer.json in the model directory; add the model's tokenizer.json"
        )


def _eval_text(model_path, m, tok, data: str | None, seqlen: int, max_windows: int | None, batch_size: int):
    from . import assets
    from .eval.data import eval_windows, read_text, tokenize
    from .eval.perplexity import perplexity

    _need_tokenizer(tok, model_path)
    data = data or assets.HELDOUT
    ids = tokenize(read_text(data), tok)
    windows = eval_windows(ids, seqlen, max_windows, source=str(data))
    return data, perplexity(m, windows, batch_size=batch_size)


def cmd_eval(a) -> None:
    if a.model and a.model.endswith(".gguf") and Path(a.model).is_file():  # a packed model: the native engine
        from .eval.native import EngineLM

        path = Path(a.model)
        m = EngineLM(path, threads=a.threads)
        try:
            data, r = _eval_text(path, m, m.tokenizer(), a.data, a.seqlen, a.max_windows, a.batch_size)
        finally:
            m.close()
    else:
        path, m, tok = _load(a.model)
        _torch_threads(a, m)
        data, r = _eval_text(path, m, tok, a.data, a.seqlen, a.max_windows, a.batch_size)
    print(f"model       {path}")
    print(f"data        {data}")
    print(f"perplexity  {r.perplexity:.3f}")
    print(f"nll         {r.nll:.4f} nats/token")
    print(f"tokens      {r.tokens} predicted in {r.windows} windows of {r.seqlen}")
    print(f"time        {r.seconds:.1f} s ({r.tokens / max(r.seconds, 1e-9):.0f} tokens/s)")


def _generate_text(m, tok, prompt: str, n: int, temperature: float, seed: int) -> str:
    from .eval.generate import generate

    ids = tok.encode(prompt).ids
    out = generate(m, ids, n, temperature=temperature, seed=seed, eos_token_id=m.config.eos_token_id)
    return tok.decode(out)


def cmd_generate(a) -> None:
    from .runtime.engine import check_sampling

    check_sampling(a.n, a.temperature, 0)
    path, m, tok = _load(a.model)
    _torch_threads(a, m)
    _need_tokenizer(tok, path)
    t0 = time.time()
    text = _generate_text(m, tok, a.prompt, a.n, a.temperature, a.seed)
    print(a.prompt + text)
    _log(f"{a.n} tokens in {time.time() - t0:.2f} s (torch reference)")


def cmd_demo(a) -> None:
    """The main job on the embedded model, end to end (grows with the pipeline): evaluate the dense
    model, prune it to C_4^n at 50% (n per row by the loss-aware allocation, compensated toward the
    dense outputs; no learning or reconstruction, 32 calibration windows, so that the whole demo takes
    about a minute), evaluate and generate again."""
    from . import assets
    from .eval.data import calibration_windows, read_text, tokenize
    from .prune.learn import LearnConfig
    from .prune.run import PruneConfig, prune_model

    t0 = time.time()
    path, m, tok = _load(None)
    _torch_threads(a, m)
    n_params = sum(p.numel() for p in m.parameters())
    print(
        f"model       {assets.DEFAULT_MODEL.name}: Mamba-1, {n_params / 1e6:.2f}M parameters, "
        f"{m.config.num_hidden_layers} layers, d_model {m.config.hidden_size}"
    )
    data, r = _eval_text(path, m, tok, None, a.seqlen, a.max_windows, 8)
    print(
        f"dense       perplexity {r.perplexity:.2f} on {Path(data).name} ({r.tokens} tokens, {r.seconds:.1f} s)"
    )
    print(f"generate    {DEFAULT_PROMPT}{_generate_text(m, tok, DEFAULT_PROMPT, a.n, 0.0, 0)}")
    calib = calibration_windows(tokenize(read_text(assets.CALIB), tok), a.nsamples, 256, seed=0)
    cfg = PruneConfig(method="c4", pattern="c4", sparsity=0.5, learn=LearnConfig(steps=a.steps))
    rep = prune_model(m, calib, cfg, log=_log)
    t = rep["total"]
    how = f"{a.steps} learning steps" if a.steps else "allocated, no learning"
    print(
        f"pruned      C_4^n, {t['sparsity']:.1%} of prunable weights removed, rows by n "
        f"{dict(enumerate(t['n_hist']))} ({rep['seconds']['total_s']:.0f} s, {how})"
    )
    _, r = _eval_text(path, m, tok, None, a.seqlen, a.max_windows, 8)
    print(f"sparse      perplexity {r.perplexity:.2f}")
    t1 = time.time()
    ref_text = _generate_text(m, tok, DEFAULT_PROMPT, a.n, 0.0, 0)
    t_ref = time.time() - t1
    print(f"generate    {DEFAULT_PROMPT}{ref_text}")
    _demo_engine(a, m, path, tok, a.n, ref_text, t_ref)
    print(f"done in {time.time() - t0:.1f} s (sparsamba prune / compile / run do each step; see the README)")


def _demo_engine(a, m, path, tok, n: int, ref_text: str, t_ref: float) -> None:
    """Compile the pruned model (f16) and generate with the native engine."""
    import tempfile

    from .compile import compile_model
    from .model.hf import save_model
    from .runtime.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        pruned = save_model(m, Path(tmp) / "pruned", tokenizer_dir=path)
        rep = compile_model(pruned, Path(tmp) / "model.gguf", dtype="f16")
        dense_bytes = sum(p.numel() * 4 for p in m.parameters())
        with Engine(rep.path, threads=a.threads) as eng:
            t1 = time.time()
            out = eng.generate(tok.encode(DEFAULT_PROMPT).ids, n)
            t_eng = time.time() - t1
            text = tok.decode(out)
            print(
                f"compiled    packed f16 GGUF {rep.path.stat().st_size / 1e6:.2f} MB "
                f"(dense f32 weights {dense_bytes / 1e6:.2f} MB)"
            )
            same = "same text as the torch reference" if text == ref_text else "differs from the f32 reference"
            print(f"engine      {DEFAULT_PROMPT}{text}")
            print(
                f"            {same}; {n} tokens in {t_eng * 1e3:.0f} ms with the native engine "
                f"({eng.kernels}, {eng.threads} threads) vs {t_ref * 1e3:.0f} ms with the torch reference"
            )


def cmd_prune(a) -> None:
    import json

    import torch

    from . import assets
    from .eval.data import calibration_windows, read_text, tokenize
    from .model.hf import load_any, load_tokenizer, resolve, save_any
    from .prune.config import from_recipe
    from .prune.latency import load_latency_table
    from .prune.run import prune_model

    torch.set_flush_denormal(True)
    out = Path(a.output)
    check_output(out, a.overwrite)  # fail before any work, not after it
    given = (
        "method", "pattern", "sparsity", "scope", "latency", "loss_budget", "score", "damp", "reconstruct",
        "reconstruct_lr",
    )
    cfg = from_recipe(  # options not given are None: the recipe's value, else the default, stands
        a.recipe,
        learn=dict(steps=a.steps, lr=a.lr, row_block=a.row_block),
        compensate=False if a.no_compensate else True if a.compensate else None,
        dense_target=False if a.no_dense_target else None,
        latency_table=load_latency_table(a.latency_table) if a.latency_table else None,
        debug=a.debug,
        **{k: getattr(a, k) for k in given},
    )

    src = a.model or assets.DEFAULT_MODEL
    model_dir = resolve(src)
    model = load_any(model_dir)
    _torch_threads(a, model)
    tok = load_tokenizer(model_dir)
    _need_tokenizer(tok, model_dir)
    calib = a.calib or assets.CALIB
    ids = tokenize(read_text(calib), tok)
    windows = calibration_windows(ids, a.nsamples, a.seqlen, seed=a.seed, source=str(calib))
    _log(f"calibration: {len(windows)} windows of {a.seqlen} tokens from {calib}")
    if a.device != "cpu":
        if a.device.startswith("cuda") and not torch.cuda.is_available():
            raise SparsambaError(f"--device {a.device}: no CUDA device is available; use --device cpu")
        model, windows = model.to(a.device), windows.to(a.device)
    report = prune_model(model, windows, cfg, log=_log)
    model = model.cpu()
    report["source_model"] = str(src)
    report["calibration"]["file"] = str(calib)
    report["calibration"]["seed"] = a.seed
    save_any(
        model,
        out,
        model_dir,
        {"sparsity.json": json.dumps(report, indent=2, default=str) + "\n"},
        a.overwrite,
    )
    t = report["total"]
    print(
        f"pruned      {cfg.method} {report['pattern']}: {t['zeros']} of {t['weights']} prunable weights removed "
        f"({t['sparsity']:.2%}) in {report['seconds']['total_s']:.1f} s"
    )
    if t.get("n_hist"):
        print(f"rows by n   {dict(enumerate(t['n_hist']))}")
    print(f"wrote       {out}")


def cmd_lm_eval(a) -> None:
    from . import assets
    from .eval.lmeval import run_tasks
    from .runtime.engine import check_threads

    model = a.model or str(assets.DEFAULT_MODEL)
    if model.endswith(".gguf"):  # the native engine picks its own threads unless --threads says
        if a.threads is not None:
            check_threads(a.threads)
    else:
        _torch_threads(a)
    res = run_tasks(model, a.tasks.split(","), a.include_path, a.batch_size, a.limit, threads=a.threads)
    print(f"model  {model}")
    for task, metrics in res.items():
        print(f"{task:24s} " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))


def cmd_train_tiny(a) -> None:
    from . import assets
    from .model.train_tiny import TrainConfig, train_tiny
    from .runtime.engine import check_threads

    tc = TrainConfig(steps=a.steps, seed=a.seed, threads=check_threads(a.threads), arch=a.arch)
    train_tiny(a.data or assets.KJV_TEXT, a.output, tc, overwrite=a.overwrite, log=_log)


def cmd_export_gguf(a) -> None:
    import gguf

    from . import assets
    from .export.llamacpp import export_gguf

    out = export_gguf(a.model or assets.DEFAULT_MODEL, a.output, dtype=a.dtype, overwrite=a.overwrite)
    n = len(gguf.GGUFReader(out).tensors)
    print(f"wrote       {out}")
    print(f"size        {n} tensors, {out.stat().st_size / 1e6:.1f} MB ({a.dtype}; norms, conv, A, D in f32)")


def cmd_compile(a) -> None:
    from . import assets
    from .compile import compile_model, size_table

    _torch_threads(a)
    rep = compile_model(
        a.model or assets.DEFAULT_MODEL,
        a.output,
        dtype=a.dtype,
        dump_after=a.dump_after,
        overwrite=a.overwrite,
        log=_log,
    )
    if rep.dump is not None:
        print(rep.dump)
        print(f"stopped after {a.dump_after}; nothing written (drop --dump-after to write {a.output})")
        return
    print(size_table(rep.sizes))
    worst = max(v for k, v in rep.errors.items() if k != "load")
    print(f"wrote       {rep.path} ({rep.path.stat().st_size:,} bytes, {a.dtype}, {rep.seconds:.1f} s)")
    print(f"verified    max relative logit error vs the source model {worst:.2g}")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SparsambaError(f"--tokens {text!r}: give token ids as integers separated by spaces") from None


def cmd_run(a) -> None:
    from .runtime.engine import Engine, check_sampling, set_isa

    check_sampling(a.n, a.temperature, a.top_k)  # before the model loads, not after
    got = set_isa(a.isa)
    if a.isa != "auto" and not got.startswith(a.isa):
        _log(f"--isa {a.isa}: this CPU or build has no {a.isa} kernels; running {got}")
    with Engine(
        _packed_model(a.model),
        threads=a.threads,
        device=a.device,
        device_index=a.device_index,
        fallback=a.fallback,
    ) as eng:
        if a.tokens is not None:
            ids = _parse_ids(a.tokens)
            out = eng.generate(ids, a.n, temperature=a.temperature, top_k=a.top_k, seed=a.seed)
            print(" ".join(map(str, out)))
        else:
            tok = eng.tokenizer()
            ids = tok.encode(a.prompt).ids
            if not ids:
                raise SparsambaError("the prompt is empty; give some text (or --tokens)")
            from .gguf_io import gguf_eos_token_id

            stream = TextStream(tok)
            print(a.prompt, end="", flush=True)
            t0 = time.time()
            out = eng.generate(
                ids,
                a.n,
                temperature=a.temperature,
                top_k=a.top_k,
                seed=a.seed,
                # stop at the end-of-text token, as llama.cpp and sparsamba-run do
                eos_token_id=None if a.ignore_eos else gguf_eos_token_id(eng.path),
                on_token=lambda t: print(stream.push(t), end="", flush=True),
            )
            print(stream.flush())
            _log(f"{len(out)} tokens in {time.time() - t0:.2f} s ({eng.kernels}, {eng.threads} threads)")


class TextStream:
    """Text of a growing token sequence, piece by piece, without decoding the whole sequence again per
    token (that made 8000 tokens take 12 s). The pending tokens are decoded with one token of context
    before them, whose own text is then cut off: decoders that drop a leading space at the start of
    a text (sentencepiece's) see no start there. A piece is held back while it ends mid-character."""

    def __init__(self, tok):
        self.tok = tok
        self.ids: list[int] = []
        self.done = 0  # ids[:done] are shown

    def _pending(self) -> str:
        ctx = max(self.done - 1, 0)
        head = self.tok.decode(self.ids[ctx : self.done]) if ctx < self.done else ""
        return self.tok.decode(self.ids[ctx:])[len(head) :]

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._pending()
        if text.endswith("\ufffd"):
            return ""
        self.done = len(self.ids)
        return text

    def flush(self) -> str:
        text = self._pending()
        self.done = len(self.ids)
        return text


def cmd_bench(a) -> None:
    import statistics

    from .runtime.engine import Engine

    try:
        threads = [int(t) for t in a.threads.split(",")]
    except ValueError:
        raise SparsambaError(f"--threads {a.threads!r}: give thread counts as integers, e.g. 1,2") from None
    models = [_packed_model(m) for m in a.models] or [_packed_model(None)]
    print(f"| model | kernels | threads | size MB | pp{a.n_prompt} t/s | tg{a.n_gen} t/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for path in models:
        for th in threads:
            with Engine(path, threads=th) as eng:
                r = eng.bench(a.n_prompt, a.n_gen, a.reps)
                pp, tg = statistics.median(r["pp"]), statistics.median(r["tg"])
                print(
                    f"| {Path(path).name} | {eng.kernels} | {th} | {eng.info.file_bytes / 1e6:.1f} "
                    f"| {pp:.1f} | {tg:.1f} |",
                    flush=True,
                )
                i = eng.info
                shape = (i.d_model, i.n_layer, i.vocab_size)
                rows.append(BenchRow(Path(path).name, th, shape, i.weight_bytes, tg, eng.kernels))
    for w in slower_despite_fewer_bytes(rows):
        _log(w)
    if a.stages:
        from .runtime.profile import decode_stages, stages_table

        for path in models:
            for th in threads:
                with Engine(path, threads=th) as eng:
                    print(f"\n{Path(path).name}, {th} thread(s): where a decode step's time goes")
                    print(stages_table(decode_stages(eng, a.n_gen)))


@dataclass
class BenchRow:
    name: str
    threads: int
    shape: tuple
    weight_bytes: int
    tg: float
    kernels: str


def slower_despite_fewer_bytes(rows: list[BenchRow]) -> list[str]:
    """Sparsity is meant to be speed: a warning for each model that reads fewer bytes per token than
    one of the same shape yet decodes slower (its kernels, not the memory, are then the limit)."""
    out = []
    for r in rows:
        for o in rows:
            if r.threads == o.threads and r.shape == o.shape and r.weight_bytes < o.weight_bytes and r.tg < o.tg:
                out.append(
                    f"warning: {r.name} decodes slower than {o.name} ({r.tg:.1f} vs {o.tg:.1f} t/s, {r.threads} "
                    f"threads) although it reads {1 - r.weight_bytes / o.weight_bytes:.0%} fewer bytes per token: "
                    f"its kernels ({r.kernels}) are compute-bound here, so this sparsity costs speed on this CPU"
                )
    return out


def cmd_profile(a) -> None:
    from .runtime.profile import profile_table, write_table

    out = Path(a.output)
    check_output(out, a.overwrite)  # fail before any work, not after it
    if a.threads is not None:
        from .runtime.engine import check_threads

        check_threads(a.threads)
    t = profile_table(a.model, dtype=a.dtype, threads=a.threads, reps=a.reps, device=a.device, log=_log)
    write_table(t, out, overwrite=a.overwrite)
    shapes = len(t["entries"]) // 5
    print(
        f"profiled    {len(t['layers'])} layers, {shapes} shapes x n = 0..4 in {t['profile_seconds']:.1f} s"
    )
    print(f"device      {t['device']}")
    print(f"wrote       {out}")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help (none shown where the default is None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _threads(s, what: str = "torch") -> None:
    s.add_argument(
        "-t",
        "--threads",
        type=int,
        help=f"threads ({what}); default: 1 for a small model (the embedded one), else every core",
    )


MODEL_HELP = "model directory or hub id (default: the embedded model)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsamba",
        description="Prune, compile and run Mamba language models. Every command that takes a model "
        "defaults to the embedded one (a small Mamba trained on the King James Bible).",
        formatter_class=_Help,
    )
    p.add_argument("--version", action="version", version=f"sparsamba {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help)

    s = command(
        "demo",
        "the main job on the embedded model: dense perplexity, C_4^n 50%% prune, sparse perplexity, "
        "compile to a packed f16 GGUF, generate with the native engine",
    )
    s.add_argument("--seqlen", type=int, default=256, help="evaluation window length in tokens")
    s.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows (default: all)")
    s.add_argument("-n", type=int, default=24, help="tokens to generate")
    s.add_argument("--steps", type=int, default=0, help="sparse-learning steps (0 = the loss-aware allocation alone)")
    s.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    _threads(s, "torch and the engine")
    s.set_defaults(func=cmd_demo)

    s = command(
        "eval",
        "perplexity of a model (directory, hub id, or a packed .gguf run by the native engine) on a text / "
        ".jsonl / .gz file or folder",
    )
    s.add_argument(
        "model",
        nargs="?",
        help="model directory or hub id (default: the embedded model), or a packed MODEL.gguf (sparsamba compile): "
        "then the native engine computes the logits, same windows",
    )
    s.add_argument("--data", help="text / .jsonl / .gz file or folder (default: the embedded held-out split)")
    s.add_argument("--seqlen", type=int, default=256, help="window length in tokens")
    s.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows (default: all)")
    s.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    _threads(s, "torch, or the engine for a packed .gguf")
    s.set_defaults(func=cmd_eval)

    s = command("generate", "generate text with the torch reference (prefill, then a recurrent step per token)")
    s.add_argument("model", nargs="?", help=MODEL_HELP)
    s.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue")
    s.add_argument("-n", type=int, default=32, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    _threads(s)
    s.set_defaults(func=cmd_generate)

    s = command(
        "prune",
        "prune (learned C_4^n: --method c4 --pattern c4 --sparsity S; or a baseline); writes an HF-format "
        "directory with exact zeros and sparsity.json",
    )
    s.add_argument("model", nargs="?", help=MODEL_HELP)
    s.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    s.add_argument("--method", help="magnitude, wanda, sparsegpt or c4 (default)")
    s.add_argument(
        "--pattern", help="c4 (learned n per row, default), c4n1/c4n2/c4n3, N:M such as 2:4, or unstructured"
    )
    s.add_argument("--sparsity", type=float, help="target fraction of prunable weights removed, in [0, 1)")
    s.add_argument("--scope", help="c4 sparsity: over the model (global, default) or uniform per block (block)")
    s.add_argument("--latency-table", help="JSON latency table (sparsamba profile, or the cost model)")
    s.add_argument("--latency", type=float, help="c4: target latency, in the table's unit")
    s.add_argument(
        "--loss-budget", type=float, help="c4: most sparsity with (L_sparse - L_dense)/L_dense <= R"
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--no-compensate", action="store_true", help="skip weight compensation (on by default for c4)"
    )
    g.add_argument("--compensate", action="store_true", help="compensate magnitude / wanda masks too")
    s.add_argument(
        "--no-dense-target",
        action="store_true",
        help="aim each layer at its own weights on the pruned inputs, not at the dense model's outputs",
    )
    s.add_argument(
        "--reconstruct", type=int, metavar="STEPS", help="Adam steps per block toward the dense block's outputs (default 0)"
    )
    s.add_argument("--reconstruct-lr", type=float, help="the reconstruction's learning rate (default 0.001)")
    s.add_argument("--score", help="c4 mask score: obs (default), wanda or magnitude")
    s.add_argument("--damp", type=float, help="SparseGPT / OBS damping (default 0.01)")
    s.add_argument("--calib", help="calibration text (default: the embedded calibration split)")
    s.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    s.add_argument("--seqlen", type=int, default=256, help="calibration window length in tokens")
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' offsets")
    s.add_argument("--steps", type=int, help="sparse-learning steps (default 0: the loss-aware allocation alone; 150 to learn)")
    s.add_argument("--lr", type=float, help="sparse-learning Adam learning rate (default 0.05)")
    s.add_argument("--row-block", type=int, help="rows sharing one n (default 1; 4 or 8 for wider SIMD)")
    s.add_argument("--recipe", help="TOML file with PruneConfig fields ([prune] and [prune.learn] tables)")
    s.add_argument("--device", default="cpu", help="where to prune: cpu or cuda")
    _threads(s)
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_prune)

    s = command("lm-eval", "zero-shot tasks through lm-evaluation-harness (offline, local task files)")
    s.add_argument(
        "model",
        nargs="?",
        help="model directory (default: the embedded model), or a packed MODEL.gguf (sparsamba compile): "
        "its loglikelihoods then come from the native engine's logits",
    )
    s.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    s.add_argument("--include-path", help="folder of task YAML files with local data")
    s.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size (torch)")
    s.add_argument("--limit", type=int, help="at most this many documents per task (default: all)")
    _threads(s, "torch, or the engine for a packed .gguf")
    s.set_defaults(func=cmd_lm_eval)

    s = command("train-tiny", "train the embedded model again from its text splits")
    s.add_argument("-o", "--output", required=True, help="output model directory (written atomically)")
    s.add_argument(
        "--data", help="folder with train.txt[.gz] and heldout.txt (default: the shipped KJV splits)"
    )
    s.add_argument("--steps", type=int, default=1500, help="training steps")
    s.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    s.add_argument("-t", "--threads", type=int, default=1, help="torch threads (the result depends on it)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.add_argument("--arch", choices=("mamba", "mamba2"), default="mamba", help="Mamba-1 or Mamba-2 (same width, depth)")
    s.set_defaults(func=cmd_train_tiny)

    s = command("export-gguf", "the same weights as a plain mamba / mamba2 GGUF that llama.cpp runs (the speed baseline)")
    s.add_argument("model", nargs="?", help=MODEL_HELP)
    s.add_argument("-o", "--output", required=True, help="output .gguf file (written atomically)")
    s.add_argument("--dtype", choices=formats.LLAMACPP, default="f32", help="dtype of the weight matrices")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_export_gguf)

    s = command(
        "compile",
        "a (pruned) Mamba-1 or Mamba-2 into the packed GGUF the native engine runs (reorder, fold, fuse, pack); "
        "prints the bytes of each format (dense, CSR, ours)",
    )
    s.add_argument(
        "model", nargs="?", help="HF-format Mamba-1 / Mamba-2 directory, dense or pruned with exact zeros (default: the embedded model)"
    )
    s.add_argument("-o", "--output", required=True, help="output .gguf file (written atomically)")
    s.add_argument("--dtype", choices=formats.PACKED, default="f16", help="dtype of the weight matrices")
    s.add_argument(
        "--dump-after",
        choices=("reorder", "fold", "fuse", "pack"),
        help="print the plan after this pass and stop without writing",
    )
    _threads(s, "torch, for the verifier")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_compile)

    packed_help = "packed .gguf file (sparsamba compile); default: the embedded model, compiled once into a cache"
    s = command(
        "run", "generate with the native engine from a packed GGUF (--tokens for ids, --device opencl)"
    )
    s.add_argument("model", nargs="?", help=packed_help)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="text, tokenized with the file's tokenizer")
    g.add_argument("--tokens", help="prompt as token ids (\"1 2 3\"); prints the new ids")
    s.add_argument("-n", type=int, default=64, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely; 0 = all tokens")
    s.add_argument("--ignore-eos", action="store_true", help="generate all -n tokens, past the end-of-text token")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    _threads(s, "the engine")
    s.add_argument("--device", choices=("cpu", "opencl"), default="cpu", help="where the model runs")
    s.add_argument(
        "--device-index", type=int, default=-1, help="OpenCL device; -1 = the first GPU, else the first device"
    )
    s.add_argument(
        "--fallback", action="store_true", help="run on the CPU when OpenCL cannot (with a warning)"
    )
    s.add_argument(
        "--isa",
        choices=("auto", "scalar", "avx2", "avx512", "neon"),
        default="auto",
        help="CPU kernel family; auto = the best this CPU has (avx512 uses VNNI for int8 where present)",
    )
    s.set_defaults(func=cmd_run)

    s = command("bench", "prefill / decode speed of packed models (llama-bench's pp / tg)")
    s.add_argument("models", nargs="*", help=packed_help)
    s.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens (pp)")
    s.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens (tg)")
    s.add_argument("-r", "--reps", type=int, default=5, help="repetitions; the table shows medians")
    s.add_argument("-t", "--threads", default="1,2", help="comma-separated thread counts")
    s.add_argument("--stages", action="store_true", help="also time each stage of a decode step")
    s.set_defaults(func=cmd_bench)

    s = command("profile", "measure a latency table (layer shape x n) with the engine, for prune --latency-table")
    s.add_argument("model", nargs="?", help=MODEL_HELP)
    s.add_argument("-o", "--output", required=True, help="output .json table (written atomically)")
    s.add_argument(
        "--device", default="cpu", help="where the model will run: cpu (opencl: not available yet)"
    )
    s.add_argument("--dtype", choices=formats.PACKED, default="f16", help="the compile dtype")
    s.add_argument(
        "-t", "--threads", type=int, default=None, help="engine threads (default: what the engine picks for this model)"
    )
    s.add_argument("--reps", type=int, default=None, help="timed calls per entry (default: ~50 ms of calls)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_profile)
    return p


def command_table() -> str:
    """The README's table of commands, made from the parser (so the two cannot drift apart): each
    command's positionals and required options, then its help line. ``scripts/readme_commands.py``
    writes it into the README, and a test checks that the README holds it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = ["| command | what it does |", "| --- | --- |"]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, cmd in sub.choices.items():
        words = [f"sparsamba {name}"]
        for a in cmd._actions:
            if not a.option_strings and a.dest != "help":
                meta = a.dest.upper()
                words.append(f"[{meta}...]" if a.nargs == "*" else f"[{meta}]" if a.nargs == "?" else meta)
            elif a.required:
                words.append(f"{a.option_strings[0]} {a.dest.upper()}")
        rows.append(f"| `{' '.join(words)}` | {helps[name].replace('%%', '%')} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SparsambaError as e:
        if args.debug:
            raise
        print(f"sparsamba {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, MemoryError) as e:  # a full disk, a folder we may not read, too little memory
        if args.debug:
            raise
        what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else (str(e) or type(e).__name__)
        print(f"sparsamba {args.command}: error: {what}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
