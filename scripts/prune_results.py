"""Measure every pruning method on the embedded model (and on a small LLaMA-style model trained here
on the same text) and write docs/results.{json,md} (+ docs/results_n.png with the `plots` extra).

    python scripts/prune_results.py                          # the whole grid (hours on one thread)
    python scripts/prune_results.py --sparsities 0.5 0.7     # a part of it; rows not run say so
    python scripts/prune_results.py --shard 0/2 & python scripts/prune_results.py --shard 1/2

Every row runs in its own process (its peak RSS is the row's memory) and is stored on its own under
build/prune_results/ as soon as it is done, so an interrupted or sharded run resumes where it
stopped; the docs are rewritten from every stored row after each one (``--write-only``: just that).
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
from sparsamba.prune.config import PruneConfig
from sparsamba.prune.learn import LearnConfig
from sparsamba.prune.run import prune_model

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "prune_results"
SEEDS = (0, 1, 2)  # calibration seeds of the headline rows
RECONSTRUCT = 50  # Adam steps per block of the "+ reconstruction" rows (lr 1e-3)
C4N2 = "c4n2: SparseGPT 2:4's masks, exact re-solve"


def runs(model: str, sparsities: list[float], steps: int) -> list[dict]:
    """The grid of one model: label, PruneConfig fields, calibration seed."""
    out = [dict(label="dense", method=None)]
    learned = f"C_4^n learned ({steps} steps)"
    for s in sparsities:
        for m in ("magnitude", "wanda", "sparsegpt"):
            out.append(dict(label=f"{m} unstructured", method=m, pattern="unstructured", sparsity=s))
        out.append(dict(label="C_4^n allocated (0 steps)", method="c4", pattern="c4", sparsity=s, steps=0))
        out.append(dict(label=learned, method="c4", pattern="c4", sparsity=s, steps=steps))
    if 0.5 in sparsities:
        for m in ("magnitude", "wanda", "sparsegpt"):
            for p in ("2:4", "4:8"):
                out.append(dict(label=f"{m} {p}", method=m, pattern=p))
        out.append(dict(label=C4N2, method="c4", pattern="c4n2"))
        out.append(
            dict(label=C4N2 + ", toward its own weights", method="c4", pattern="c4n2", dense_target=False)
        )
        out.append(
            dict(
                label="C_4^n allocated, per-block scope",
                method="c4",
                pattern="c4",
                sparsity=0.5,
                steps=0,
                scope="block",
            )
        )
        for r in [r for r in out if r.get("method") in ("sparsegpt", "c4") and r.get("sparsity", 0.5) == 0.5]:
            if r.get("dense_target") is False or r.get("scope") == "block" or r["pattern"] == "4:8":
                continue
            out.append({**r, "label": r["label"] + " + reconstruction", "reconstruct": RECONSTRUCT})
        if model == "kjv-mamba-tiny":  # the headline: 3 calibration seeds
            for r in [r for r in out if r.get("sparsity", 0.5) == 0.5 and r.get("method") == "c4"]:
                if r["label"] in (learned, "C_4^n allocated (0 steps)", C4N2):
                    out += [{**r, "seed": sd} for sd in SEEDS[1:]]
    return out


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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ppl = perplexity(model, held, batch_size=16, progress=False).perplexity
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
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--llama-sparsities", type=float, nargs="+", default=[0.5])
    ap.add_argument(
        "--steps", type=int, default=150, help="learning steps of the learned rows (the default prune: 0)"
    )
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th row from the i-th")
    ap.add_argument("--write-only", action="store_true", help="rewrite the docs from the stored rows")
    ap.add_argument("--extra-seeds-only", action="store_true", help="run only the headline's seeds 1, 2")
    ap.add_argument("--only", help="run only the rows whose label contains this text")
    ap.add_argument("--cache", default=str(CACHE), help="where each finished row is stored")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    out = Path(a.out)
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(assets.DEFAULT_MODEL)
    models = {"kjv-mamba-tiny": (assets.DEFAULT_MODEL, a.sparsities)}
    if not a.no_llama:
        llama = ROOT / "build" / "kjv-llama-tiny"
        if not (llama / "config.json").exists() and not a.write_only:
            t = time.time()
            train_tiny_llama(llama, tok, tokenize(read_text(assets.KJV_TEXT / "train.txt.gz"), tok))
            print(f"trained {llama} in {time.time() - t:.0f} s", flush=True)
        models["kjv-llama-tiny"] = (llama, a.llama_sparsities)
    grid = [(m, p, r) for m, (p, sps) in models.items() for r in runs(m, sps, a.steps)]
    todo = sorted(
        grid, key=lambda g: _priority(g[0], g[2], a.steps)
    )  # the headline first, for a run cut short
    i, n = (int(x) for x in a.shard.split("/"))
    ctx = mp.get_context("spawn")
    for j, (mname, mpath, r) in enumerate(todo):
        k = key(r, mname, a.nsamples, a.seqlen)
        f = Path(a.cache) / (hashlib.sha1(k.encode()).hexdigest()[:16] + ".json")
        if (
            a.write_only
            or f.exists()
            or j % n != i
            or (a.extra_seeds_only and not r.get("seed"))
            or (a.only and a.only not in r["label"])
        ):
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
    write(out, grid, a)


def _priority(model: str, r: dict, steps: int) -> int:
    s, label, mamba = r.get("sparsity", 0.5), r["label"], model == "kjv-mamba-tiny"
    head = label in (C4N2, "C_4^n allocated (0 steps)", f"C_4^n learned ({steps} steps)")
    head = head or label in ("sparsegpt 2:4", "sparsegpt unstructured")
    if r["method"] is None:
        return 0
    if mamba and r.get("seed"):
        return 4
    if mamba and s == 0.5 and head:
        return 1
    if mamba and s == 0.7 and (head or label == "sparsegpt unstructured"):
        return 2
    if mamba and "reconstruction" in label:
        return 3
    return 5 if mamba else 6


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
        k = key(r, mname, a.nsamples, a.seqlen)
        f = Path(a.cache) / (hashlib.sha1(k.encode()).hexdigest()[:16] + ".json")
        if f.exists():
            rows.append(json.loads(f.read_text()))
        else:
            missing.append((mname, r))
    return rows, missing


def write(out: Path, grid, a) -> None:
    rows, missing = _stored(grid, a)
    commits = sorted({r["commit"] for r in rows})
    machines = sorted({f"{r.get('machine')} (torch {r.get('torch')})" for r in rows})
    meta = dict(
        machines=machines,
        threads=1,
        commits=commits,
        calibration=f"{a.nsamples} windows x {a.seqlen} tokens of calib.txt (seed 0; seeds {SEEDS} for the headline)",
        evaluation=f"held-out split, non-overlapping windows of {a.seqlen}",
        learn_steps=a.steps,
        reconstruct_steps=RECONSTRUCT,
        not_run=[
            f"{m}: {r['label']} at {r.get('sparsity', 0.5):.0%}, seed {r.get('seed', 0)}" for m, r in missing
        ],
    )
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    cmd = "python scripts/prune_results.py " + " ".join(
        ["--sparsities", *map(str, a.sparsities)]
        + ([] if a.no_llama else ["--llama-sparsities", *map(str, a.llama_sparsities)])
    )
    md = [
        "# Pruning results",
        "",
        f"Generated by `{cmd}` (commit {', '.join(commits) or '-'}, 1 thread per row; machines: "
        f"{'; '.join(machines) or '-'}). "
        f"Perplexity on the held-out split (non-overlapping windows of {a.seqlen} tokens); calibration: "
        f"{meta['calibration']}. Sparsity counts the prunable projections only. Every method aims at the "
        "dense model's layer outputs (`dense_target`, the default) unless its row says otherwise; "
        f"'+ reconstruction' rows add {RECONSTRUCT} Adam steps per block (lr 1e-3) toward the dense block's "
        "outputs. Cells give the mean ± standard deviation over calibration seeds where there are several "
        "(their count in brackets); '—' marks a row of the grid that was not run. Time and memory: the 50% "
        "row's prune seconds (1 thread) and its process's peak RSS (model, prune and evaluation).",
        "",
    ]
    for mname in dict.fromkeys(m for m, _, _ in grid):
        mgrid = [r for m, _, r in grid if m == mname]
        mr = [r for r in rows if r["model"] == mname]
        dense = next((r["perplexity"] for r in mr if r["method"] is None), float("nan"))
        sps = sorted({r["sparsity"] for r in mgrid if r.get("sparsity")})
        md += [
            f"## {mname}",
            "",
            f"Dense perplexity: **{dense:.2f}**." if dense == dense else "Dense perplexity: not run.",
            "",
            "| method | " + " | ".join(f"{s:.0%}" for s in sps) + " | 50%: prune time | 50%: peak memory |",
            "| --- |" + " --- |" * (len(sps) + 2),
        ]
        for label in dict.fromkeys(r["label"] for r in mgrid if r["method"]):
            cells = []
            for s in sps:
                want = [r for r in mgrid if r["label"] == label and r.get("sparsity", 0.5) == s]
                hit = [r["perplexity"] for r in mr if r["label"] == label and r.get("sparsity", 0.5) == s]
                if not want:
                    cells.append("")
                elif not hit:
                    cells.append("—")
                elif len(hit) == 1:
                    cells.append(f"{hit[0]:.2f}" + (" (1)" if len(want) > 1 else ""))
                else:
                    cells.append(f"{statistics.mean(hit):.2f} ± {statistics.stdev(hit):.2f} ({len(hit)})")
            r50 = [
                r
                for r in mr
                if r["label"] == label and r.get("sparsity", 0.5) == 0.5 and r.get("seed", 0) == 0
            ]
            t = f"{r50[0]['prune_seconds']:.0f} s" if r50 else ""
            mem = f"{r50[0]['peak_rss_mb']} MB" if r50 else ""
            md.append(f"| {label} | " + " | ".join(cells) + f" | {t} | {mem} |")
        learned = [r for r in mr if r.get("steps") and r.get("learning") and r.get("seed", 0) == 0]
        if learned:
            md += [
                "",
                "Learning diagnostics (seed 0): expected sparsity at the start → before the fix-up, rows "
                "moved by the fix-up, rows whose n differs from the allocation.",
                "",
            ]
            for r in learned:
                d = r["learning"]
                md.append(
                    f"- {r['sparsity']:.0%}: {d['expected_at_start']:.3f} → {d['expected_before_fixup']:.3f}, "
                    f"{d['rows_moved_by_fixup']:.1%} moved, {d['rows_changed_from_start']:.1%} changed"
                )
        md += _layer_map(out, mname, mr)
        md.append("")
    if missing:
        md += [f"Not run ({len(missing)} rows of the grid): see `meta.not_run` in results.json.", ""]
    out.with_suffix(".md").write_text("\n".join(md))


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return md
    png = out.with_name(f"{out.name}_n_{mname}.png")
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
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md + ["", f"![rows at each n per layer]({png.name})"]


if __name__ == "__main__":
    main()
