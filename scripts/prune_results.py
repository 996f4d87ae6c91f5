"""Measure every pruning method on the embedded model (and on a small LLaMA-style model trained here
on the same text) and write docs/results.{json,md,svg}.

    python scripts/prune_results.py                 # everything (about an hour on 2 cores)
    python scripts/prune_results.py --quick         # 50% only, 200 learning steps

Rows already in results.json with the same configuration are reused, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsamba import assets, load_tokenizer
from sparsamba.eval.data import calibration_windows, eval_windows, read_text, tokenize
from sparsamba.eval.perplexity import perplexity
from sparsamba.model.hf import LogitsOnly, load_any
from sparsamba.prune.learn import LearnConfig
from sparsamba.prune.run import PruneConfig, prune_model

ROOT = Path(__file__).resolve().parent.parent


def runs(sparsities: list[float]) -> list[dict]:
    out = [dict(label="dense", method=None)]
    for s in sparsities:
        for m in ("magnitude", "wanda", "sparsegpt"):
            out.append(dict(label=f"{m} unstructured", method=m, pattern="unstructured", sparsity=s))
        out.append(dict(label="C_4^n learned (c4), compensated", method="c4", pattern="c4", sparsity=s))
        out.append(
            dict(
                label="C_4^n learned (c4), no compensation",
                method="c4",
                pattern="c4",
                sparsity=s,
                compensate=False,
            )
        )
    if 0.5 in sparsities:
        for m in ("magnitude", "wanda", "sparsegpt"):
            for p in ("2:4", "4:8"):
                out.append(dict(label=f"{m} {p}", method=m, pattern=p, sparsity=0.5))
        out.append(dict(label="C_4^n fixed (c4n2), compensated", method="c4", pattern="c4n2", sparsity=0.5))
        out.append(
            dict(
                label="C_4^n fixed (c4n2), no compensation",
                method="c4",
                pattern="c4n2",
                sparsity=0.5,
                compensate=False,
            )
        )
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


def key(r: dict, model: str, steps: int) -> str:
    return json.dumps(
        [model, r.get("method"), r.get("pattern"), r.get("sparsity"), r.get("compensate"), steps]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=1000, help="sparse-learning steps")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # the pruner's many small solves are far slower with 2 contended threads
    steps = 200 if a.quick else a.steps
    sparsities = [0.5] if a.quick else [0.3, 0.5, 0.7]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.with_suffix(".json").exists():
        for r in json.loads(out.with_suffix(".json").read_text())["rows"]:
            done[r["key"]] = r
    tok = load_tokenizer(assets.DEFAULT_MODEL)
    held = eval_windows(tokenize(read_text(assets.HELDOUT), tok), a.seqlen)
    calib = calibration_windows(tokenize(read_text(assets.CALIB), tok), a.nsamples, a.seqlen, seed=0)
    models = {"kjv-mamba-tiny": assets.DEFAULT_MODEL}
    if not a.no_llama:
        llama = ROOT / "build" / "kjv-llama-tiny"
        if not (llama / "config.json").exists():
            t = time.time()
            train_tiny_llama(llama, tok, tokenize(read_text(assets.KJV_TEXT / "train.txt.gz"), tok))
            print(f"trained {llama} in {time.time() - t:.0f} s", flush=True)
        models["kjv-llama-tiny"] = llama
    rows = []
    for mname, mpath in models.items():
        # the transformer is the paper's side table: 50% only
        for r in runs(sparsities if mname == "kjv-mamba-tiny" else [0.5]):
            k = key(r, mname, steps)
            if k in done:
                rows.append(done[k])
                continue
            model = load_any(mpath)
            t = time.time()
            rep = None
            if r["method"] is not None:
                cfg = PruneConfig(
                    method=r["method"],
                    pattern=r["pattern"],
                    sparsity=r["sparsity"] if r["pattern"] in ("unstructured", "c4") else None,
                    compensate=r.get("compensate"),
                    learn=LearnConfig(steps=steps),
                )
                rep = prune_model(model, calib, cfg, progress=False, log=lambda *_: None)
            ppl = perplexity(model, held, batch_size=16, progress=False).perplexity
            row = dict(
                key=k,
                model=mname,
                arch="llama" if isinstance(model, LogitsOnly) else "mamba",
                **r,
                measured_sparsity=rep["total"]["sparsity"] if rep else 0.0,
                perplexity=ppl,
                prune_seconds=rep["seconds"]["total_s"] if rep else 0.0,
            )
            rows.append(row)
            print(
                f"{mname:15s} {r['label']:40s} {row['measured_sparsity']:.3f} ppl {ppl:8.2f} "
                f"({row['prune_seconds']:.0f} s, {time.time() - t:.0f} s in all)",
                flush=True,
            )
            write(out, rows, a, steps)
    write(out, rows, a, steps)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        return ""


COMMIT = _commit()  # the code the run started with


def write(out: Path, rows: list[dict], a, steps: int) -> None:
    commit = COMMIT
    meta = dict(
        machine=platform.machine(),
        processor=platform.processor(),
        threads=1,
        commit=commit,
        torch=torch.__version__,
        calibration=f"{a.nsamples} windows x {a.seqlen} tokens of calib.txt (seed 0)",
        evaluation=f"held-out split, non-overlapping windows of {a.seqlen}",
        learn_steps=steps,
    )
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    md = [
        "# Pruning results",
        "",
        "Generated by `python scripts/prune_results.py` "
        f"(commit {commit}, torch {torch.__version__}, 1 thread). Perplexity on the held-out split "
        f"(non-overlapping windows of {a.seqlen} tokens); calibration: {meta['calibration']}; "
        f"sparse learning: {steps} steps. Sparsity counts the prunable projections only.",
        "",
    ]
    for mname in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == mname]
        dense = next((r["perplexity"] for r in mr if r["method"] is None), float("nan"))
        sps = sorted({r["sparsity"] for r in mr if r.get("sparsity")})
        md += [
            f"## {mname}",
            "",
            f"Dense perplexity: **{dense:.2f}**.",
            "",
            "| method | " + " | ".join(f"{s:.0%}" for s in sps) + " | prune time at 50% |",
            "| --- |" + " --- |" * (len(sps) + 1),
        ]
        for label in dict.fromkeys(r["label"] for r in mr if r["method"]):
            cells = []
            for s in sps:
                hit = [r for r in mr if r["label"] == label and r.get("sparsity") == s]
                cells.append(f"{hit[0]['perplexity']:.2f}" if hit else "")
            t50 = [r for r in mr if r["label"] == label and r.get("sparsity") == 0.5]
            t = f"{t50[0]['prune_seconds']:.0f} s" if t50 else ""
            md.append(f"| {label} | " + " | ".join(cells) + f" | {t} |")
        md.append("")
    md += ["![perplexity vs sparsity](results.svg)", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".svg").write_text(svg_plot(rows))


def svg_plot(rows: list[dict]) -> str:
    """Perplexity vs sparsity, one line per unstructured / learned method, per model (plain SVG)."""
    series = {}
    for r in rows:
        if r["method"] and r["pattern"] in ("unstructured", "c4"):
            series.setdefault(f"{r['model']}: {r['label']}", []).append((r["sparsity"], r["perplexity"]))
    series = {k: v for k, v in series.items() if len(v) > 1}  # lines only: models run at several sparsities
    if not series:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>"
    W, H, L, B = 960, 420, 60, 40
    pts = [p for s in series.values() for p in s]
    ymin, ymax = math.log(min(p[1] for p in pts)), math.log(max(p[1] for p in pts))
    ymax = ymax if ymax > ymin else ymin + 1

    def xy(s, ppl):
        return L + (s - 0.25) / 0.5 * (W - L - 400), H - B - (math.log(ppl) - ymin) / (ymax - ymin) * (
            H - 2 * B
        )

    colors = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    el = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' font-size='11'>",
        f"<rect width='{W}' height='{H}' fill='white'/>",
        f"<text x='{L}' y='16'>held-out perplexity (log scale) vs sparsity</text>",
    ]
    for s in (0.3, 0.5, 0.7):
        x, _ = xy(s, math.exp(ymin))
        el.append(f"<text x='{x - 10:.0f}' y='{H - 20}'>{s:.0%}</text>")
    for i, (name, p) in enumerate(sorted(series.items())):
        p = sorted(p)
        c = colors[i % len(colors)]
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(*q) for q in p))
        el.append(f"<polyline fill='none' stroke='{c}' stroke-width='2' points='{d}'/>")
        for q in p:
            x, y = xy(*q)
            el.append(
                f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{c}'><title>{name} {q[0]:.0%}: {q[1]:.2f}</title></circle>"
            )
        el.append(f"<text x='{W - 380}' y='{40 + 15 * i}' fill='{c}'>{name}</text>")
    el.append("</svg>")
    return "\n".join(el)


if __name__ == "__main__":
    main()
