"""Measure every pruning method on the embedded model (the shipped Mamba-2 beside it, and a small
LLaMA-style model trained here on the same text) and write docs/results.{json,md} (+ docs/results_n_*.png
with the `plots` extra).

    python scripts/prune_results.py                          # the whole grid (hours on one thread)
    python scripts/prune_results.py --sparsities 0.5 0.7     # a part of it; rows not run say so
    python scripts/prune_results.py --model kjv-mamba2-tiny --skip learned
    python scripts/prune_results.py --shard 0/2 & python scripts/prune_results.py --shard 1/2

Every row runs in its own process (its peak RSS is the row's memory) and is stored on its own under
build/prune_results/ as soon as it is done, so an interrupted or sharded run resumes where it
stopped; the docs are rewritten from every stored row after each one (``--write-only``: just that).
A row absent from that cache is taken from the committed docs/results.json when it has it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsamba import assets, load_tokenizer
from sparsamba.eval.data import calibration_windows, eval_windows, read_text, tokenize
from sparsamba.eval.perplexity import perplexity
from sparsamba.model.hf import load_any
from sparsamba.outputs import write_file_atomically
from sparsamba.prune.config import PruneConfig
from sparsamba.prune.learn import LearnConfig
from sparsamba.prune.run import prune_model

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "prune_results"
SEEDS = (0, 1, 2)  # calibration seeds of the headline rows
CACHE_DIR = [str(CACHE)]  # --cache, for the targets' demo timings
RECONSTRUCT = 50  # Adam steps per block of the "+ reconstruction" rows (lr 1e-3)
C4N2 = "c4n2: SparseGPT 2:4's masks, exact re-solve"
OWN = C4N2 + ", toward its own weights"
ALLOC = "C_4^n allocated (0 steps)"
BLOCK = "C_4^n allocated, per-block scope"
REC = " + reconstruction"
PACKED = "C_4^n allocated, packed GGUF through the engine"
# the learning's revision, part of a learned row's key: rows of an older algorithm are not reused
# (2: the target an equality on the hard choice; the rows of 1 are in git history)
LEARN = 2
MAMBA2 = "kjv-mamba2-tiny"  # trained by `sparsamba train-tiny --arch mamba2`, shipped beside the default


def runs(model: str, sparsities: list[float], steps: int) -> list[dict]:
    """The grid of one model: label, PruneConfig fields, calibration seed.

    Every method at every sparsity it can reach: 2:4, 4:8 and c4n2 fix the sparsity at 50%, so they
    have no 30% or 70% row. Every row but the "toward its own weights" ablation is run with and without
    ``RECONSTRUCT`` steps of block-wise reconstruction (the same for every method)."""
    out = [dict(label="dense", method=None)]
    learned = f"C_4^n learned ({steps} steps)"
    if model == MAMBA2:
        return out + _mamba2_runs(sparsities, steps)
    base = []
    for s in sparsities:
        for m in ("magnitude", "wanda", "sparsegpt"):
            base.append(dict(label=f"{m} unstructured", method=m, pattern="unstructured", sparsity=s))
        base.append(dict(label=ALLOC, method="c4", pattern="c4", sparsity=s, steps=0))
        base.append(dict(label=BLOCK, method="c4", pattern="c4", sparsity=s, steps=0, scope="block"))
        base.append(dict(label=learned, method="c4", pattern="c4", sparsity=s, steps=steps, learn_rev=LEARN))
    if 0.5 in sparsities:
        for m in ("magnitude", "wanda", "sparsegpt"):
            for p in ("2:4", "4:8"):
                base.append(dict(label=f"{m} {p}", method=m, pattern=p))
        base.append(dict(label=C4N2, method="c4", pattern="c4n2"))
    out += base
    out += [{**r, "label": r["label"] + REC, "reconstruct": RECONSTRUCT} for r in base]
    if 0.5 in sparsities:
        out.append(dict(label=OWN, method="c4", pattern="c4n2", dense_target=False))
    if model == "kjv-mamba-tiny":  # the headline: 3 calibration seeds
        for r in [r for r in base if r.get("sparsity", 0.5) == 0.5 and r["label"] in (learned, ALLOC, C4N2)]:
            out += [{**r, "seed": sd} for sd in SEEDS[1:]]
    for s in (0.5, 0.7):  # the packed model through the native engine, f32 and int8, beside torch
        if s in sparsities and model == "kjv-mamba-tiny":
            out.append(dict(label=PACKED, method="c4", pattern="c4", sparsity=s, steps=0, packed=True))
    return out


def _mamba2_runs(sparsities: list[float], steps: int) -> list[dict]:
    """The Mamba-2 table of issue 13 (beside Mamba-1's): SparseGPT 2:4 / 4:8 / unstructured, Wanda 2:4,
    C_4^n allocated (the default) and learned, each with and without reconstruction; magnitude and
    Wanda unstructured as in the Mamba-1 grid."""
    base = []
    for s in sparsities:
        for m in ("magnitude", "wanda", "sparsegpt"):
            base.append(dict(label=f"{m} unstructured", method=m, pattern="unstructured", sparsity=s))
        base.append(dict(label=ALLOC, method="c4", pattern="c4", sparsity=s, steps=0))
    for s in sparsities:
        base.append(
            dict(
                label=f"C_4^n learned ({steps} steps)",
                method="c4",
                pattern="c4",
                sparsity=s,
                steps=steps,
                learn_rev=LEARN,
            )
        )
    if 0.5 in sparsities:
        base += [dict(label=f"sparsegpt {p}", method="sparsegpt", pattern=p) for p in ("2:4", "4:8")]
        base.append(dict(label="wanda 2:4", method="wanda", pattern="2:4"))
    return base + [{**r, "label": r["label"] + REC, "reconstruct": RECONSTRUCT} for r in base]


def train_tiny_llama(out: Path, tok, text_ids: torch.Tensor, steps: int = 800, seed: int = 0) -> None:
    """A LLaMA-style model of about the embedded Mamba's size, on the same tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        lr = 3e-3 * min(1, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, text_ids.numel() - 129, (8,), generator=g)
        w = torch.stack([text_ids[s : s + 129] for s in starts.tolist()])
        loss = F.cross_entropy(model(w[:, :-1]).logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((assets.DEFAULT_MODEL / name).read_bytes())


def key(r: dict, model: str, nsamples: int, seqlen: int) -> str:
    fields = {k: v for k, v in sorted(r.items()) if k != "label"}
    return json.dumps([model, nsamples, seqlen, fields])


def row_file(cache: Path, k: str) -> Path:
    return cache / (hashlib.sha1(k.encode()).hexdigest()[:16] + ".json")


def seed_cache(cache: Path, published: Path, keys: list[str]) -> int:
    """Store every row of the committed ``published`` results.json whose key is one of ``keys`` and
    absent from ``cache``, so that a fresh checkout resumes (and ``--write-only`` rewrites the docs)
    without the build folder of the run that made them. Returns the number of rows stored."""
    if not published.exists():
        return 0
    pub = json.loads(published.read_text())
    want, done = set(keys), 0
    for row in pub["rows"]:
        f = row_file(cache, row["key"])
        if row["key"] in want and not f.exists():
            f.write_text(json.dumps(row) + "\n")
            done += 1
    demo = cache / "demo.json"
    if pub["meta"].get("demo") and not demo.exists():
        demo.write_text(json.dumps(pub["meta"]["demo"], indent=1) + "\n")
    return done


def run_row(r: dict, mpath: str, nsamples: int, seqlen: int, q) -> None:
    """One row in a fresh process: prune, evaluate, report its peak memory."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # the pruner's many small solves are far slower with 2 contended threads
    tok = load_tokenizer(assets.DEFAULT_MODEL)
    held = eval_windows(tokenize(read_text(assets.HELDOUT), tok), seqlen)
    calib = calibration_windows(
        tokenize(read_text(assets.CALIB), tok), nsamples, seqlen, seed=r.get("seed", 0)
    )
    model = load_any(mpath)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rep = None
    if r["method"] is not None:
        cfg = PruneConfig(
            method=r["method"],
            pattern=r["pattern"],
            sparsity=r.get("sparsity") if r["pattern"] in ("unstructured", "c4") else None,
            scope=r.get("scope", "global"),
            dense_target=r.get("dense_target", True),
            reconstruct=r.get("reconstruct", 0),
            learn=LearnConfig(steps=r.get("steps", 0)),
        )
        rep = prune_model(model, calib, cfg, progress=False, log=lambda *_: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process only: the row's own
    ppl = perplexity(model, held, batch_size=16, progress=False).perplexity
    packed = _packed(model, mpath, held) if r.get("packed") else None
    layer_n = {k: v["n_hist"] for k, v in rep["layers"].items()} if rep and r["pattern"] == "c4" else None
    q.put(
        dict(
            measured_sparsity=rep["total"]["sparsity"] if rep else 0.0,
            perplexity=ppl,
            prune_seconds=rep["seconds"]["total_s"] if rep else 0.0,
            peak_rss_mb=round(peak),
            model_rss_mb=round(loaded),
            learning=rep.get("learning") if rep else None,
            layer_n=layer_n,
            engine=packed,
        )
    )


def _packed(model, mpath: str, held: torch.Tensor) -> dict:
    """Perplexity of the pruned model compiled to a packed GGUF (f32 and int8), run by the native engine
    on the same windows as the torch twin (1 engine thread)."""
    import tempfile

    from sparsamba.compile import compile_model
    from sparsamba.eval.native import EngineLM
    from sparsamba.model.hf import save_model

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        pruned = save_model(model, Path(tmp) / "pruned", tokenizer_dir=mpath)
        for dtype in ("f32", "int8"):
            rep = compile_model(pruned, Path(tmp) / f"{dtype}.gguf", dtype=dtype)
            m = EngineLM(rep.path, threads=1)
            try:
                t = time.time()
                ppl = perplexity(m, held, batch_size=16, progress=False).perplexity
            finally:
                m.close()
            out[dtype] = dict(
                perplexity=ppl, bytes=rep.path.stat().st_size, eval_seconds=round(time.time() - t)
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--llama-sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument(
        "--steps", type=int, default=150, help="learning steps of the learned rows (the default prune: 0)"
    )
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--mamba2-sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-mamba2", action="store_true")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th row from the i-th")
    ap.add_argument("--write-only", action="store_true", help="rewrite the docs from the stored rows")
    ap.add_argument("--list", action="store_true", help="print the rows still to run, in order, and stop")
    ap.add_argument("--extra-seeds-only", action="store_true", help="run only the headline's seeds 1, 2")
    ap.add_argument(
        "--demo", action="store_true", help="time `sparsamba demo` (wall, CPU, load average) and stop"
    )
    ap.add_argument("--only", help="run only the rows whose label contains this text")
    ap.add_argument("--skip", help="do not run the rows whose label contains this text")
    ap.add_argument(
        "--model", choices=("kjv-mamba-tiny", MAMBA2, "kjv-llama-tiny"), help="run only this model's rows"
    )
    ap.add_argument("--cache", default=str(CACHE), help="where each finished row is stored")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    out = Path(a.out)
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    CACHE_DIR[0] = a.cache
    if a.demo:
        time_demo(Path(a.cache) / "demo.json")
        return
    tok = load_tokenizer(assets.DEFAULT_MODEL)
    models = {"kjv-mamba-tiny": (assets.DEFAULT_MODEL, a.sparsities)}
    if not a.no_mamba2:
        models[MAMBA2] = (assets.HERE / MAMBA2, a.mamba2_sparsities)
    llama = ROOT / "build" / "kjv-llama-tiny"
    if not a.no_llama:
        models["kjv-llama-tiny"] = (llama, a.llama_sparsities)
    grid = [(m, p, r) for m, (p, sps) in models.items() for r in runs(m, sps, a.steps)]
    todo = sorted(
        grid, key=lambda g: _priority(g[0], g[2], a.steps)
    )  # the headline first, for a run cut short
    seeded = seed_cache(
        Path(a.cache), out.with_suffix(".json"), [key(r, m, a.nsamples, a.seqlen) for m, _, r in grid]
    )
    if seeded:
        print(f"stored {seeded} rows of {out.with_suffix('.json').name} in {a.cache}", flush=True)
    i, n = (int(x) for x in a.shard.split("/"))
    ctx = mp.get_context("spawn")
    for j, (mname, mpath, r) in enumerate(todo):
        k = key(r, mname, a.nsamples, a.seqlen)
        f = row_file(Path(a.cache), k)
        if (
            a.write_only
            or f.exists()
            or j % n != i
            or (a.extra_seeds_only and not r.get("seed"))
            or (a.only and a.only not in r["label"])
            or (a.skip and a.skip in r["label"])
            or (a.model and a.model != mname)
        ):
            continue
        if (
            mname == "kjv-llama-tiny" and not (llama / "config.json").exists() and not a.list
        ):  # trained when first needed
            t = time.time()
            train_tiny_llama(llama, tok, tokenize(read_text(assets.KJV_TEXT / "train.txt.gz"), tok))
            (llama / "train_seconds.txt").write_text(f"{time.time() - t:.0f}\n")
            print(f"trained {llama} in {time.time() - t:.0f} s", flush=True)
        if a.list:
            print(f"{mname:15s} {r['label']:62s} {r.get('sparsity', 0.5):.0%} seed {r.get('seed', 0)}")
            continue
        t = time.time()
        q = ctx.Queue()
        p = ctx.Process(target=run_row, args=(r, str(mpath), a.nsamples, a.seqlen, q))
        p.start()
        res = q.get()
        p.join()
        row = dict(
            key=k,
            model=mname,
            commit=COMMIT,
            machine=MACHINE,
            torch=torch.__version__,
            wall_seconds=round(time.time() - t),
            **r,
            **res,
        )
        f.write_text(json.dumps(row) + "\n")
        print(
            f"{mname:15s} {r['label']:55s} seed {r.get('seed', 0)} {res['measured_sparsity']:.3f} "
            f"ppl {res['perplexity']:8.2f} ({res['prune_seconds']:.0f} s prune, {row['wall_seconds']} s in all, "
            f"{res['peak_rss_mb']} MB peak)",
            flush=True,
        )
        write(out, grid, a)
    if not a.list:
        write(out, grid, a)


def _priority(model: str, r: dict, steps: int) -> int:
    """The order of a run cut short: the headline, the engine's packed rows, the fast methods, the rest
    without reconstruction, the headline's reconstruction, Mamba-2, the rest of Mamba-1, then the
    LLaMA-style model."""
    s, label, mamba = r.get("sparsity", 0.5), r["label"], model == "kjv-mamba-tiny"
    rec = label.endswith(REC)
    if model == MAMBA2:
        return 8 if not rec else 9
    head = label.removesuffix(REC) in (
        C4N2,
        ALLOC,
        f"C_4^n learned ({steps} steps)",
        "sparsegpt 2:4",
        "sparsegpt unstructured",
    )
    if r["method"] is None:
        return 0 if mamba else 11
    if not mamba:
        return 12 if rec else 11
    if r.get("seed"):
        return 1
    if head and not rec and s in (0.5, 0.7):
        return 1
    if r.get("packed"):
        return 2
    if r["method"] in ("magnitude", "wanda") and not rec:
        return 3
    if not rec and not r.get("steps"):
        return 4
    if rec and head and s in (0.5, 0.7):
        return 6 if r.get("steps") else 5
    if not rec:
        return 7
    return 10


def time_demo(f: Path) -> None:
    """`sparsamba demo` in a child process: its wall and CPU seconds and the load average around it
    (the target is for an idle machine; the CPU seconds are what an idle 2-core machine would need at
    least). Appended to ``f``."""
    import sys

    load0, t = os.getloadavg()[0], time.time()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-c", "from sparsamba.cli import main; raise SystemExit(main(['demo']))"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    runs = json.loads(f.read_text()) if f.exists() else []
    runs.append(
        dict(
            commit=COMMIT,
            machine=MACHINE,
            wall_seconds=round(time.time() - t, 1),
            cpu_seconds=round(cpu, 1),
            load_before=load0,
            load_after=os.getloadavg()[0],
        )
    )
    f.write_text(json.dumps(runs, indent=1) + "\n")
    print(runs[-1])


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        return ""


COMMIT = _commit()  # the code the run started with


def _machine() -> str:
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


MACHINE = _machine()


def _stored(grid, a) -> tuple[list[dict], list[tuple]]:
    rows, missing = [], []
    for mname, _, r in grid:
        f = row_file(Path(a.cache), key(r, mname, a.nsamples, a.seqlen))
        if f.exists():
            rows.append(json.loads(f.read_text()))
        else:
            missing.append((mname, r))
    return rows, missing


def _cell(vals: list[float], want: int) -> str:
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.2f}" + (f" (1 of {want})" if want > 1 else "")
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)})"


def write(out: Path, grid, a) -> None:
    rows, missing = _stored(grid, a)
    commits = sorted({r["commit"] for r in rows})
    machines = sorted({f"{r.get('machine')} (torch {r.get('torch')})" for r in rows})
    train_s = ROOT / "build" / "kjv-llama-tiny" / "train_seconds.txt"
    pub = out.with_suffix(".json")
    prev = json.loads(pub.read_text())["meta"] if pub.exists() else {}  # a checkout without build/
    meta = dict(
        machines=machines,
        threads=1,
        commits=commits,
        calibration=f"{a.nsamples} windows x {a.seqlen} tokens of calib.txt (seed 0; seeds {SEEDS} for the headline)",
        evaluation=f"held-out split, non-overlapping windows of {a.seqlen}",
        learn_steps=a.steps,
        reconstruct_steps=RECONSTRUCT,
        llama_train_seconds=int(train_s.read_text()) if train_s.exists() else prev.get("llama_train_seconds"),
        demo=_demo_runs(),
        not_run=[
            f"{m}: {r['label']} at {r.get('sparsity', 0.5):.0%}, seed {r.get('seed', 0)}" for m, r in missing
        ],
    )
    text = json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n"
    write_file_atomically(out.with_suffix(".json"), lambda p: p.write_text(text))  # makes --out's folder
    cmd = "python scripts/prune_results.py " + " ".join(
        ["--sparsities", *map(str, a.sparsities)]
        + ([] if a.no_mamba2 else ["--mamba2-sparsities", *map(str, a.mamba2_sparsities)])
        + ([] if a.no_llama else ["--llama-sparsities", *map(str, a.llama_sparsities)])
    )
    md = [
        "# Pruning results",
        "",
        f"Generated by `{cmd}` (commits {', '.join(commits) or '-'}, 1 thread per row; machines: "
        f"{'; '.join(machines) or '-'}). The run resumes from the rows it has stored; each row records "
        "its commit in results.json. "
        f"Perplexity on the held-out split (non-overlapping windows of {a.seqlen} tokens); calibration: "
        f"{meta['calibration']}. Sparsity counts the prunable projections only. Every method aims at the "
        "dense model's layer outputs (`dense_target`, the default) unless its row says otherwise; "
        f"'+ reconstruction' adds {RECONSTRUCT} Adam steps per block (lr 1e-3) toward the dense block's "
        "outputs, the same for every method. Cells give the mean ± standard deviation over calibration "
        "seeds where there are several (their count in brackets); '—' marks a row of the grid that was "
        "not run. 2:4, 4:8 and c4n2 fix the sparsity at 50%: they have no 30% or 70% row. Prune time: "
        "the prune's own seconds on 1 thread (seed 0), on a shared 2-core machine whose load varied "
        "(1-9) during the run, so times are upper bounds; peak memory: the high-water RSS of the row's own "
        "process (a fresh one per row) at the end of the prune (model, calibration and prune). "
        f"The learned rows are those of the learning's revision {LEARN} (the target an equality on the "
        "hard choice, learn.py); the rows of the former learning are in this file's git history.",
        "",
    ]
    for mname in dict.fromkeys(m for m, _, _ in grid):
        mgrid = [r for m, _, r in grid if m == mname]
        mr = [r for r in rows if r["model"] == mname]
        dense = next((r["perplexity"] for r in mr if r["method"] is None), float("nan"))
        md += [
            f"## {mname}",
            "",
            f"Dense perplexity: **{dense:.2f}**." if dense == dense else "Dense perplexity: not run.",
        ]
        if mname == MAMBA2:
            md[-1] += (
                " The Mamba-2 shipped beside the embedded model (`sparsamba train-tiny --arch mamba2`, "
                "the same text and tokenizer); its prunable projections are in_proj and out_proj "
                "(issue 13's table)."
            )
        if mname == "kjv-llama-tiny" and meta["llama_train_seconds"]:
            md[-1] += f" Trained here in {meta['llama_train_seconds']} s (1 thread, 800 steps)."
        md += [
            "",
            "| method | sparsity | perplexity | + reconstruction | prune time | peak memory "
            "| prune time, + rec. | peak memory, + rec. | commit |",
            "| --- |" + " --- |" * 8,
        ]

        def get(label: str, sp: float, mgrid=mgrid, mr=mr) -> tuple[list[dict], int]:
            want = [r for r in mgrid if r["label"] == label and r.get("sparsity", 0.5) == sp]
            hit = [
                r for r in mr if r["label"] == label and r.get("sparsity", 0.5) == sp and not r.get("packed")
            ]
            return hit, len(want)

        labels = [lb for lb in dict.fromkeys(r["label"] for r in mgrid if r["method"]) if lb != PACKED]
        for label in [lb for lb in labels if not lb.endswith(REC)]:
            for sp in sorted({r.get("sparsity", 0.5) for r in mgrid if r["label"] == label}):
                hit, want = get(label, sp)
                rhit, rwant = get(label + REC, sp)
                h0 = [r for r in hit if r.get("seed", 0) == 0]
                r0 = [r for r in rhit if r.get("seed", 0) == 0]
                rc = _cell([r["perplexity"] for r in rhit], rwant) if rwant else ""
                md.append(
                    f"| {label} | {sp:.0%} | {_cell([r['perplexity'] for r in hit], want)} | {rc} | "
                    + (f"{h0[0]['prune_seconds']:.0f} s | {h0[0]['peak_rss_mb']} MB | " if h0 else " |  | ")
                    + (f"{r0[0]['prune_seconds']:.0f} s | {r0[0]['peak_rss_mb']} MB |" if r0 else " |  |")
                    + f" {', '.join(sorted({r['commit'] for r in hit + rhit}))} |"
                )
        packed = sorted((r for r in mr if r.get("packed") and r.get("engine")), key=lambda r: r["sparsity"])
        if any(r.get("packed") for r in mgrid):
            md += [
                "",
                f"The '{ALLOC}' model compiled to a packed GGUF and scored by the native engine (1 thread, the "
                "same windows), beside its torch fp32 twin:",
                "",
                "| sparsity | torch fp32 | engine f32 | engine int8 | int8 − fp32 | f32 file | int8 file | commit |",
                "| --- |" + " --- |" * 7,
            ]
            for r in packed:
                e = r["engine"]
                md.append(
                    f"| {r['sparsity']:.0%} | {r['perplexity']:.2f} | {e['f32']['perplexity']:.2f} | "
                    f"{e['int8']['perplexity']:.2f} | {e['int8']['perplexity'] - r['perplexity']:+.2f} | "
                    f"{e['f32']['bytes'] / 1e6:.2f} MB | {e['int8']['bytes'] / 1e6:.2f} MB | {r['commit']} |"
                )
            if not packed:
                md.append("| — | not run | | | | | | |")
        learned = [r for r in mr if r.get("steps") and r.get("learning") and r.get("seed", 0) == 0]
        if learned:
            md += [
                "",
                "Learning diagnostics (seed 0): expected sparsity at the start → before the fix-up (the "
                "argmax's), rows moved by the fix-up, rows whose n differs from the allocation.",
                "",
            ]
            for r in sorted(learned, key=lambda r: (r["sparsity"], r.get("reconstruct", 0))):
                d = r["learning"]
                md.append(
                    f"- {r['label']}, {r['sparsity']:.0%}: {d['expected_at_start']:.3f} → "
                    f"{d['expected_before_fixup']:.3f}"
                    + (f" ({d['argmax_before_fixup']:.3f})" if "argmax_before_fixup" in d else "")
                    + f", {d['rows_moved_by_fixup']:.1%} moved, "
                    f"{d['rows_changed_from_start']:.1%} changed"
                )
        if mname == "kjv-mamba-tiny":
            md += _targets(mr, dense, a.steps)
        md += _layer_map(out, mname, mr)
        md.append("")
    if missing:
        md += [f"Not run ({len(missing)} rows of the grid):", ""]
        md += [f"- {x}" for x in meta["not_run"]]
        md.append("")
    write_file_atomically(out.with_suffix(".md"), lambda p: p.write_text("\n".join(md)))


def _targets(mr: list[dict], dense: float, steps: int) -> list[str]:
    """Issue 12's perplexity targets against the stored rows: met / missed with the figures."""

    def ppl(label: str, sp: float) -> list[float]:
        return [r["perplexity"] for r in mr if r["label"] == label and r.get("sparsity", 0.5) == sp]

    learned = f"C_4^n learned ({steps} steps)"
    got = {
        k: ppl(lb, sp)
        for k, lb, sp in (
            ("l50", learned, 0.5),
            ("l70", learned, 0.7),
            ("a50", ALLOC, 0.5),
            ("a70", ALLOC, 0.7),
            ("s24", "sparsegpt 2:4", 0.5),
            ("su50", "sparsegpt unstructured", 0.5),
            ("su70", "sparsegpt unstructured", 0.7),
            ("c4n2", C4N2, 0.5),
        )
    }
    m = {k: statistics.mean(v) if v else float("nan") for k, v in got.items()}
    sd = {k: statistics.stdev(v) if len(v) > 1 else float("nan") for k, v in got.items()}

    def res(ok: bool | None) -> str:
        return "undecided: a single seed" if ok is None else "**met**" if ok else "**missed**"

    out = [
        "",
        "### Targets (issue 12)",
        "",
        "| target | figure | result |",
        "| --- | --- | --- |",
    ]

    def line(target: str, need: tuple[str, ...], figure, ok) -> None:
        if any(not got[k] for k in need):  # a row not (yet) run under the current code
            out.append(f"| {target} | not run: {', '.join(k for k in need if not got[k])} | |")
        else:
            out.append(f"| {target} | {figure()} | {res(ok())} |")

    def below_sparsegpt(pct: int, key: str, name: str) -> None:
        su = f"su{pct}"
        line(
            f"{pct}%: {name} C_4^n below unstructured SparseGPT",
            (key, su),
            lambda: f"{m[key]:.2f} vs {m[su]:.2f}",
            lambda: m[key] < m[su],
        )

    for key, name in (("l50", "learned"), ("a50", "allocated (the default)")):
        line(
            f"50%: {name} C_4^n's increase over dense ≤ half of SparseGPT 2:4's",
            (key, "s24"),
            lambda key=key: (
                f"+{m[key] - dense:.2f} vs {(m['s24'] - dense) / 2:.2f} (half of +{m['s24'] - dense:.2f})"
            ),
            lambda key=key: m[key] - dense <= (m["s24"] - dense) / 2,
        )
        below_sparsegpt(50, key, name)
    for key, name in (("l70", "learned"), ("a70", "allocated (the default)")):
        below_sparsegpt(70, key, name)
    for key, name in (("l50", "learned"), ("a50", "allocated")):
        gap, noise = m["c4n2"] - m[key], 3 * max(sd[key], sd["c4n2"])
        line(
            f"50%: {name} beats c4n2 by a clear margin (> 3 × the larger seed std)",
            (key, "c4n2"),
            lambda key=key, gap=gap, noise=noise: (
                f"{m[key]:.2f} ± {sd[key]:.2f} vs {m['c4n2']:.2f} ± {sd['c4n2']:.2f} ({len(got[key])} and "
                f"{len(got['c4n2'])} seeds): {gap:.2f} better, 3 × std = {noise:.2f}"
            ),
            lambda gap=gap, noise=noise: gap > noise if noise == noise else None,
        )
    default = [r for r in mr if r["label"] == ALLOC and r.get("sparsity") == 0.5 and not r.get("packed")]
    t = max(r["prune_seconds"] for r in default)
    out.append(
        f"| prune of the embedded model, default settings (= '{ALLOC}', 50%), ≤ 10 min on one thread | "
        f"{t:.0f} s, the slowest of its {len(default)} seeds on the loaded machine | {res(t <= 600)} |"
    )
    demo = _demo_runs()
    for d in demo:
        out.append(
            f"| `sparsamba demo` ≤ 90 s on an idle machine | {d['wall_seconds']:.0f} s wall, {d['cpu_seconds']:.0f} s "
            f"CPU, load average {d['load_before']:.1f} → {d['load_after']:.1f} (commit {d['commit']}) | "
            + (
                res(d["wall_seconds"] <= 90)
                if d["load_before"] < 1.5
                else f"not measurable: the machine was not idle ({d['cpu_seconds']:.0f} s of CPU)"
            )
            + " |"
        )
    if not demo:
        out.append("| `sparsamba demo` ≤ 90 s on an idle machine | not timed (`--demo`) | |")
    return out


def _demo_runs() -> list[dict]:
    """The `--demo` timings stored beside the rows (they go into results.json's meta too)."""
    demo = Path(CACHE_DIR[0]) / "demo.json"
    return json.loads(demo.read_text()) if demo.exists() else []


def _layer_map(out: Path, mname: str, mr: list[dict]) -> list[str]:
    """Mean n per layer of the learned 50% row as a table, and a picture layers × n if matplotlib is there."""
    r = next(
        (
            r
            for r in mr
            if r.get("layer_n") and r.get("steps") and r.get("sparsity") == 0.5 and r.get("seed", 0) == 0
        ),
        None,
    )
    r = r or next(
        (r for r in mr if r.get("layer_n") and r.get("sparsity") == 0.5 and r.get("seed", 0) == 0), None
    )
    if r is None:
        return []
    names = list(r["layer_n"])
    frac = [[c / max(sum(h), 1) for c in h] for h in (r["layer_n"][k] for k in names)]
    md = [
        "",
        f"Per-layer n of '{r['label']}' at 50% (fraction of the layer's rows at each n):",
        "",
        "| layer | n=0 | n=1 | n=2 | n=3 | n=4 | sparsity |",
        "| --- |" + " --- |" * 6,
    ]
    for k, f in zip(names, frac):
        md.append(
            f"| {k} | "
            + " | ".join(f"{x:.2f}" for x in f)
            + f" | {sum(n * x for n, x in enumerate(f)) / 4:.0%} |"
        )
    png = out.with_name(f"{out.name}_n_{mname}.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # keep a picture drawn before (it may be older than the table: say so)
        if not png.exists():
            return md
        print(f"matplotlib is missing: {png} was not redrawn", flush=True)
        return md + ["", f"![rows at each n per layer]({png.name})"]
    fig, ax = plt.subplots(figsize=(5, 0.22 * len(names) + 1.2))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(5), [f"n={n}" for n in range(5)])
    ax.set_yticks(
        range(len(names)),
        [k.replace("backbone.layers.", "").replace("inner.model.layers.", "") for k in names],
        fontsize=6,
    )
    ax.set_title(f"{mname}: rows at each n (50%)", fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of rows")
    fig.tight_layout()
    write_file_atomically(png, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return md + ["", f"![rows at each n per layer]({png.name})"]


if __name__ == "__main__":
    main()
