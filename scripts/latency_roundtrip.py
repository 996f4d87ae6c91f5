"""The latency round trip: profile -> prune to a latency target -> compile -> measure.

1. ``sparsamba profile`` measures the latency table of a random Mamba-1 on this machine;
2. the target is set between the all-dense and the all-c4n3 latency the table predicts
   (``--fraction`` of the way from c4n3 to dense);
3. ``sparsamba prune --method c4 --pattern c4 --latency-table T --latency target`` learns n per row;
4. ``sparsamba compile`` packs the pruned model (and the dense one, for comparison);
5. the engine times the compiled models' prunable products (``sb_profile_model``: every prunable layer
   of every block, in decode order, each pass starting from flushed caches), the same thing each table
   entry times for one synthetic layer.

Figures: target; predicted = the table summed over the pruned model's rows (= the target to within
one row, by the prune's fix-up); measured = Σ over the compiled model's prunable layers of the
engine's median time. All per decoded token, weights from memory. Also the dense model, measured
alongside (rounds alternate between the two), and the error of the ratio pruned / dense against
target / table-dense, in which a machine-wide slowdown between profiling and measuring cancels out;
and the table profiled again in rounds alternating with the measurement, whose prediction for the
pruned model isolates the table's model error (rows adding up per layer, synthetic classes for real
ones) from a shared machine's drift. Prints them and, with --json, the whole record.

    python scripts/latency_roundtrip.py [--hidden 512] [--layers 4] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_model(out: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A random Mamba-1 with the embedded model's tokenizer (so that prune can read calibration text)."""
    import torch

    from sparsamba import assets
    from sparsamba.model.hf import save_model
    from sparsamba.model.mamba1 import Mamba1Config, Mamba1LM

    torch.manual_seed(seed)
    m = Mamba1LM(Mamba1Config(vocab_size=4096, hidden_size=hidden, num_hidden_layers=layers, state_size=16))
    return save_model(m, out, tokenizer_dir=assets.DEFAULT_MODEL)


def table_total(table: dict, layers: dict, n: int) -> float:
    """Predicted seconds per token with every row of every prunable layer at n."""
    cost = {(e["out"], e["in"], e["n"]): e["seconds"] for e in table["entries"]}
    return sum(cost[(o, i, n)] for o, i in layers.values())


def measure(paths: list[Path], keys: list[tuple], dtype: str, threads: int, reps: int, rounds: int):
    """(Σ of the prunable layers' median times of each model, the table entries ``keys`` measured
    again), medians over ``rounds`` rounds that alternate between the models and the entries, so that
    a neighbour's load on a shared machine hits all of them alike."""
    from sparsamba.runtime.engine import Engine
    from sparsamba.runtime.profile import default_reps, measure_layers, profile_linear, release

    engines = [Engine(p, threads=threads) for p in paths]
    sums: list[list[float]] = [[] for _ in paths]
    fresh: dict[tuple, list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        for k, e in enumerate(engines):
            sums[k].append(sum(measure_layers(e, reps).values()))
        for key in keys:
            fresh[key].append(profile_linear(*key, dtype, default_reps(*key, dtype), threads=threads))
    release()
    for e in engines:
        e.close()
    return [statistics.median(s) for s in sums], {k: statistics.median(v) for k, v in fresh.items()}


def roundtrip(
    work: Path,
    hidden: int = 512,
    layers: int = 4,
    threads: int = 1,
    dtype: str = "f32",
    fraction: float = 0.5,
    steps: int = 20,
    reps: int = 60,
    rounds: int = 5,
    log=print,
) -> dict:
    from sparsamba import load_model
    from sparsamba.cli import main
    from sparsamba.runtime.profile import predicted_latency, profile_table, write_table

    work = Path(work)
    t0 = time.time()
    model = make_model(work / "model", hidden, layers)
    table = profile_table(model, dtype=dtype, threads=threads)
    tpath = write_table(table, work / "table.json")
    t_profile = time.time() - t0
    dense, c4n3 = table_total(table, table["layers"], 0), table_total(table, table["layers"], 3)
    target = c4n3 + fraction * (dense - c4n3)
    recipe = work / "fast.toml"  # masks by score, no compensation: the structure is what is timed
    recipe.write_text('select = "score"\ncompensate = false\n')
    args = ["--method", "c4", "--pattern", "c4", "--latency-table", str(tpath), "--latency", repr(target)]
    args += ["--steps", str(steps), "--nsamples", "4", "--seqlen", "64", "--recipe", str(recipe)]
    t1 = time.time()
    if main(["prune", str(model), *args, "-o", str(work / "pruned")]):
        raise RuntimeError("sparsamba prune failed")
    for src, dst in ((work / "pruned", work / "pruned.gguf"), (model, work / "dense.gguf")):
        if main(["compile", str(src), "-o", str(dst), "--dtype", dtype]):
            raise RuntimeError(f"sparsamba compile {src} failed")
    t_prune = time.time() - t1
    predicted = predicted_latency(table, load_model(work / "pruned"))
    t2 = time.time()
    keys = [(e["out"], e["in"], e["n"]) for e in table["entries"] if e["n"] < 4]
    (measured, measured_dense), fresh = measure(
        [work / "pruned.gguf", work / "dense.gguf"], keys, dtype, threads, reps, rounds
    )
    again = {
        **table,
        "entries": [{"out": o, "in": i, "n": n, "seconds": s} for (o, i, n), s in fresh.items()],
    }
    again["entries"] += [{"out": o, "in": i, "n": 4, "seconds": 0.0} for o, i in {k[:2] for k in keys}]
    predicted_now = predicted_latency(again, load_model(work / "pruned"))
    t_measure = time.time() - t2
    rec = {
        "device": table["device"],
        "model": {"hidden": hidden, "layers": layers, "dtype": dtype},
        "threads": table["threads"],
        "dense_predicted_s": dense,
        "c4n3_predicted_s": c4n3,
        "target_s": target,
        "predicted_s": predicted,
        "measured_s": measured,
        "dense_measured_s": measured_dense,
        # the table profiled again alongside the measurement: what it predicts for the same moment
        "predicted_same_window_s": predicted_now,
        "same_window_error": measured / predicted_now - 1,
        "error_vs_target": measured / target - 1,
        "dense_error": measured_dense / dense - 1,
        # the same, relative to the dense model measured alongside: a machine-wide slowdown between
        # profiling and measuring (a neighbour's load) cancels out
        "relative_error": (measured / measured_dense) / (target / dense) - 1,
        "seconds": {"profile": t_profile, "prune_compile": t_prune, "measure": t_measure},
    }
    log(
        f"{table['device']}; d_model {hidden}, {layers} layers, {dtype}\n"
        f"                    table       measured\n"
        f"dense          {dense * 1e6:10.1f} us {measured_dense * 1e6:10.1f} us ({rec['dense_error']:+.1%})\n"
        f"all c4n3       {c4n3 * 1e6:10.1f} us\n"
        f"target         {target * 1e6:10.1f} us\n"
        f"pruned         {predicted * 1e6:10.1f} us {measured * 1e6:10.1f} us ({rec['error_vs_target']:+.1%} vs target)\n"
        f"pruned / dense {target / dense:10.3f}    {measured / measured_dense:10.3f}    ({rec['relative_error']:+.1%})\n"
        f"pruned, table profiled again alongside: {predicted_now * 1e6:.1f} us predicted, "
        f"{rec['same_window_error']:+.1%} measured\n"
        f"time: profile {t_profile:.1f} s, prune + compile {t_prune:.1f} s, measure {t_measure:.1f} s"
    )
    return rec


def main_cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=("f32", "f16", "int8"), default="f32")
    p.add_argument("--fraction", type=float, default=0.5, help="target = c4n3 + fraction x (dense - c4n3)")
    p.add_argument("--steps", type=int, default=20, help="sparse-learning steps")
    p.add_argument("--reps", type=int, default=60, help="passes per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", help="keep the files here (default: a temporary folder)")
    p.add_argument("--json", help="write the record here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rec = roundtrip(
            Path(a.workdir or tmp),
            a.hidden,
            a.layers,
            a.threads,
            a.dtype,
            a.fraction,
            a.steps,
            a.reps,
            a.rounds,
            log=lambda m: print(m, file=sys.stderr),
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=2) + "\n")
    keys = ("target_s", "predicted_s", "measured_s", "error_vs_target", "relative_error", "same_window_error")
    print(json.dumps({k: rec[k] for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
