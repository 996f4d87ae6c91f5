"""The kernel microbenchmark: the engine's decode GEMV, every class (n = 0..3 weights removed per group
of 4) and dtype (f16, int8, f32), on the Mamba-130M and -370M layer shapes, 1 thread, weights cold,
against the single-thread memory read probe measured in the same run. Not part of CI; see
bench/README.md.

    python bench/kernels.py                 # 3 interleaved rounds, ~50 ms of calls per entry (~7 min)
    python bench/kernels.py --quick         # 1 round, ~20 ms per entry, to check that it runs
    python bench/kernels.py --isa scalar    # another kernel family (process-wide, as the engine's)

Every timing is the engine's own ``sb_profile_linear`` (src/engine/profile.c, through
``sparsamba.runtime.profile.profile_linear``): one synthetic layer whose rows all remove n of every 4
weights, laid out as a packed file lays it out, copied round robin over the profiler's working set
(max(64 MiB, 2 x the LLC of one core), at most 512 MiB) so that each call reads its weights from
memory, timed per call through the decode path (``sb_linear_vec``), median of the calls. GB/s = the
bytes one call streams (``streamed_bytes``: values + codes + row indices + scales of the layout the
engine reads) / that median. The read probe is the engine's ``sb_read_bandwidth`` (SIMD sums over a
``--probe-mib`` buffer in whole passes, one stream with the kernels' prefetch, 8 streams side by side
and 4 streams with the kernels' prefetch, each pass timed by the thread's CPU clock, the best of 3
passes of each), measured right before every entry of every round at the entry's thread count. An
entry's % of the probe is the median over the rounds of its rate ÷ the probe taken right before it:
this machine's read rate moves between levels (~14.5 and ~19 GB/s on one thread) in spells of seconds,
and a probe taken a group of entries earlier, or the median of the run's probes, is often in another
spell than the kernel it divides. Beside the first probe of every 1-thread group, numpy's max over the
same size: the check that the probe is the ceiling.

Writes bench/results/kernels.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from statistics import median

# bench/ is not a package: run as a script, its own folder is on sys.path
import machine

from sparsamba import formats

DTYPES = ("f16", "int8", "f32")
NS = (0, 1, 2, 3)
# (layer, out, in) of one Mamba block, per published shape (d_model 768 / 1024, expand 2, N 16,
# dt_rank = ceil(d_model / 16)): the four prunable products of a decode step
SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "130m": [("in_proj", 3072, 768), ("x_proj", 80, 1536), ("dt_proj", 1536, 48), ("out_proj", 768, 1536)],
    "370m": [("in_proj", 4096, 1024), ("x_proj", 96, 2048), ("dt_proj", 2048, 64), ("out_proj", 1024, 2048)],
}
TARGETS = {"f16": 90.0, "int8": 85.0}  # % of the read probe, 1 thread (issue 11)
THREADS_TARGET = 1.8  # 2 threads vs 1 on the 370M shapes
BUSY = 0.15  # as speed.BUSY: a run where others used more of the CPUs is flagged
MIN_COLD_MIB = 128  # below this working set the weights could come from a large LLC


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Bytes one decode product streams: the one place that knows the packed layout


def _up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def streamed_bytes(out: int, inn: int, n: int, dtype: str, layout: int) -> int:
    """Bytes of weights one decode product of an (out, inn) layer whose rows all remove n of every 4
    inputs reads from memory, in packed-format ``layout`` (1 or 2; docs/packed-format.md). Headers that
    the loader parses once are not counted; x and y stay in L1 and are not counted either.

    v1 (row-major classes): per row the kept values, 4-bit keep masks (two groups a byte, n > 0), an
    i32 output-row index, and for int8 an f32 scale.
    v2 ("rows in lanes"): per 16-row block an i32 index per lane (and an f32 scale, int8), then the
    stream: per panel of P inputs (K rounded to 64 if K <= 2048, else 1024) and chunk of 64 inputs one
    record of 2-bit codes (0 / 64 / 128 / 64 bytes for n = 0 / 1 / 2 / 3) and 16 rows x slots values,
    slots = groups x (4 - n) (int8: rounded up to even), the record padded to 64 bytes; rows padded
    to a multiple of 16."""
    d = formats.get(dtype)
    if layout == 1:
        groups = math.ceil(inn / 4)
        kept = groups * (4 - n)
        codes = math.ceil(groups / 2) if n else 0
        return out * (kept * d.value_bytes + codes + 4 + (4 if d.scaled else 0))
    if layout == 2:
        B, CHUNK = 16, 64
        nb = math.ceil(out / B)
        code_bytes = (0, 4 * B, 8 * B, 4 * B)[n]

        def record(groups: int) -> int:
            slots = groups * (4 - n)
            slots += slots & 1 if d.scaled else 0  # int8 values go in pairs of slots
            return _up(code_bytes + slots * B * d.value_bytes, 64)

        panel = _up(inn, CHUNK) if inn <= 2048 else 1024
        per_block = 0
        for p0 in range(0, inn, panel):
            full, rest = divmod(min(panel, inn - p0), CHUNK)
            per_block += full * record(16) + (record(math.ceil(rest / 4)) if rest else 0)
        return nb * (4 * B + (4 * B if d.scaled else 0) + per_block)
    raise ValueError(f"packed format layout {layout} is not known to streamed_bytes")


def engine_layout() -> int:
    """The packed-format version this checkout's compiler writes (and its engine reads)."""
    from sparsamba.compile.packed_gguf import FORMAT_VERSION

    return FORMAT_VERSION


def working_set_mib() -> float:
    """The profiler's working set as src/engine/profile.c sizes it (its own figure is not exported):
    max(64 MiB, 2 x the largest cache of cpu0 in sysfs), at most 512 MiB."""
    llc = 0
    for i in range(8):
        try:
            s = Path(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size").read_text().strip()
        except OSError:
            break
        num = int("".join(c for c in s if c.isdigit()) or 0)
        llc = max(llc, num << (10 if s.endswith("K") else 20 if s.endswith("M") else 0))
    if not llc:
        try:
            llc = max(0, os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError):
            llc = 0
    return min(max(64 << 20, 2 * llc), 512 << 20) / 2**20


# ----------------------------------------------------------------------------------------------
# Measuring


def probe_gbs(mib: int, threads: int, passes: int) -> float:
    """The engine's read probe: best of ``passes`` passes of SIMD sums over ``mib`` MiB, GB/s."""
    from sparsamba.runtime.engine import read_bandwidth

    return read_bandwidth(mib, threads, passes) / 1e9


def numpy_max_gbs(mib: int, passes: int) -> float:
    """numpy's max over a ``mib`` MiB float32 array (one thread), the best of ``passes`` whole passes timed
    by this thread's CPU clock as the probe's are: a reader the probe must not fall below."""
    import numpy as np

    v = np.ones(mib << 18, dtype=np.float32)  # written: every page mapped
    best = math.inf
    for _ in range(passes):
        t = time.thread_time()
        v.max()
        best = min(best, time.thread_time() - t)
    return v.nbytes / best / 1e9 if best > 0 else 0.0


def run(a: argparse.Namespace) -> tuple[dict, list[dict]]:
    from sparsamba.runtime import profile
    from sparsamba.runtime.engine import set_isa

    isa = set_isa(a.isa)
    layout = a.layout or engine_layout()
    keys = [
        (m, layer, o, i, n, dt) for m in a.models for layer, o, i in SHAPES[m] for n in NS for dt in a.dtypes
    ]
    # 2 threads vs 1: the 370M shapes (the engine runs the 130M model on 1 thread by default)
    # (--quick: f16 only, OpenMP's 2-thread calls crawl on a busy machine)
    keys2 = [k for k in keys if k[0] == "370m" and (k[5] == "f16" or not a.quick)] if a.two_threads else []
    # groups of entries (a model's products in one dtype, at one thread count), each measured right
    # after a read probe at that thread count, so that the probes see the machine the kernels saw
    groups: dict[tuple, list[tuple]] = {}
    for T, ks in ((1, keys), (2, keys2)):
        for k in ks:
            groups.setdefault((T, k[0], k[5]), []).append(k)
    times: dict[tuple, list[float]] = {(k, T): [] for (T, _, _), ks in groups.items() for k in ks}
    probe_at: dict[tuple, list[float]] = {kT: [] for kT in times}  # the probe right before each call series
    probes: dict[int, list[float]] = {T: [] for T, _, _ in groups}
    numpy_max: list[float] = []  # once per 1-thread group, before its entries
    budget = 0.02 if a.quick else 0.05
    busy: list[float] = []  # per group: share of the CPUs other processes used meanwhile
    t0 = time.time()
    try:
        for r in range(a.rounds):
            # rounds interleave every entry, so a neighbour's burst of load lands on one round of each
            # rather than on all of one entry; the median over rounds is kept
            for (T, m, dt), ks in groups.items():
                if a.idle_wait > 0:
                    machine.wait_idle(a.idle_wait)
                mark = machine.busy_mark()
                if T == 1:
                    numpy_max.append(numpy_max_gbs(a.probe_mib, 3))
                for k in ks:
                    _, _, o, i, n, _ = k
                    reps = a.reps or profile.default_reps(o, i, n, dt, budget)
                    probes[T].append(probe_gbs(a.probe_mib, T, 3))
                    probe_at[k, T].append(probes[T][-1])
                    times[k, T].append(profile.profile_linear(o, i, n, dt, reps, threads=T))
                busy.append(machine.others_busy(mark))
                log(
                    f"round {r + 1}/{a.rounds} {m} {dt} {T}T: probe {probes[T][-1]:.1f} GB/s, "
                    f"{len(ks)} entries, others used {busy[-1]:.0%} of the CPUs ({time.time() - t0:.0f} s)"
                )
    finally:
        profile.release()
        profile._lib().sb_set_threads(1)
    rows = []
    for k in keys:
        m, layer, o, i, n, dt = k
        nbytes = streamed_bytes(o, i, n, dt, layout)
        s1 = median(times[k, 1])
        dense = median(times[(m, layer, o, i, 0, dt), 1])
        row = dict(
            model=m, layer=layer, out=o, inn=i, n=n, dtype=dt, bytes=nbytes,
            seconds_1t=s1, gbs_1t=nbytes / s1 / 1e9,
            pct_probe_1t=paired_pct([(nbytes, times[k, 1], probe_at[k, 1])]),
            speedup_vs_dense=dense / s1, samples_1t=times[k, 1], probe_samples_1t=probe_at[k, 1],
        )  # fmt: skip
        if (k, 2) in times:
            s2 = median(times[k, 2])
            row.update(
                seconds_2t=s2, gbs_2t=nbytes / s2 / 1e9, speedup_2t=s1 / s2, samples_2t=times[k, 2],
                pct_probe_2t=paired_pct([(nbytes, times[k, 2], probe_at[k, 2])]), probe_samples_2t=probe_at[k, 2],
            )  # fmt: skip
        rows.append(row)
    meta = dict(
        command="python bench/kernels.py" + "".join(" " + shlex.quote(x) for x in a.argv),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine.machine_info(),
        git=machine.git_info(),
        versions=machine.versions(),
        kernels=isa,
        layout=layout,
        rounds=a.rounds,
        reps=a.reps or f"auto (~{budget * 1000:.0f} ms of calls per entry)",
        working_set_mib=working_set_mib(),
        probe_mib=a.probe_mib,
        probe_gbs={str(T): median(v) for T, v in probes.items()},
        probe_samples={str(T): v for T, v in probes.items()},
        numpy_max_gbs=median(numpy_max) if numpy_max else None,
        numpy_max_samples=numpy_max,
        load_average=os.getloadavg(),
        others_busy_max=round(max(busy), 3),
        others_busy=[round(b, 3) for b in busy],
        seconds=round(time.time() - t0, 1),
    )
    return meta, rows


# ----------------------------------------------------------------------------------------------
# Views


def paired_pct(entries: list[tuple[int, list[float], list[float]]]) -> float:
    """% of the read probe of one or more products together, paired by round. ``entries``: per product,
    its bytes, its time in each round and the probe (GB/s) taken right before it in that round. Per
    round: the time the probe takes to read the products' bytes, each at its own probe, ÷ the time the
    products took (for one product: its rate ÷ its probe); the median over the rounds."""
    rounds = len(entries[0][1])
    if any(len(t) != rounds or len(p) != rounds for _, t, p in entries):
        raise ValueError("every product needs one time and one probe per round")
    per_round = [
        100 * sum(b / (p[r] * 1e9) for b, _, p in entries) / sum(t[r] for _, t, _ in entries)
        for r in range(rounds)
    ]
    return median(per_round)


def ceiling_check(meta: dict, rows: list[dict]) -> list[str]:
    """The probe against the other readers of the same run: numpy's max (CPU-clock passes beside each
    1-thread probe) and our fastest dense (n = 0) f16 product; a probe below either is no ceiling."""
    p1 = meta["probe_gbs"]["1"]
    others = {}
    if meta.get("numpy_max_gbs"):
        others["numpy max"] = meta["numpy_max_gbs"]
    dense = [r for r in rows if r["n"] == 0 and r["dtype"] == "f16"]
    if dense:
        best = max(dense, key=lambda r: r["gbs_1t"])
        others[f"our dense f16 {best['model']} {best['layer']}"] = best["gbs_1t"]
    if not others:
        return []
    above = [k for k, v in others.items() if v > p1]
    over = [
        f"{r['model']} {r['layer']} {r['dtype']} n = {r['n']} ({r['pct_probe_1t']:.0f}%)"
        for r in rows
        if r.get("pct_probe_1t", 0) > 100
    ]
    return [
        "The probe as the ceiling (1 thread, medians of the run): probe "
        f"{p1:.1f} GB/s, "
        + ", ".join(f"{k} {v:.1f} GB/s ({100 * v / p1:.0f}%)" for k, v in others.items())
        + ". "
        + (
            f"⚠ faster than the probe: {', '.join(above)}."
            if above
            else "Nothing here reads faster than the probe."
        )
        + (f" ⚠ faster than the probe taken right before them: {', '.join(over)}." if over else ""),
        "",
    ]


def markdown(meta: dict, rows: list[dict]) -> str:
    m, g, p1 = meta["machine"], meta["git"], meta["probe_gbs"]["1"]
    md = [
        "# Kernels: the decode GEMV per class and dtype, 1 thread, weights cold",
        "",
        f"Generated by `{meta['command']}` on {m['cpu']} ({m['cores']} cores, {', '.join(m['simd'])}), "
        f"commit {g['commit']}{' (with uncommitted changes)' if g['dirty'] else ''}, {meta['date']}; "
        f"kernels **{meta['kernels']}**, packed format v{meta['layout']}. Each entry: the engine's "
        f"`sb_profile_linear` (one synthetic layer, every row at n, copies rotated over a "
        f"{meta['working_set_mib']:.0f} MiB working set), median of the calls, median of {meta['rounds']} "
        f"interleaved round(s). GB/s = bytes streamed per call (values + codes + row indices + scales) ÷ "
        f"time. Read probe (the engine's SIMD sum over {meta['probe_mib']} MiB in whole passes, one stream with the "
        f"kernels' prefetch, 8 streams side by side and 4 prefetched streams, timed by the thread's CPU clock, best of 3 passes of "
        f"each, taken right before every entry of every round; the median of the run's probes): **1 thread {p1:.1f} GB/s**"
        + (f", 2 threads {meta['probe_gbs']['2']:.1f} GB/s" if "2" in meta["probe_gbs"] else "")
        + f". Load average at the end: {' '.join(f'{x:.2f}' for x in meta['load_average'])}.",
        "",
        "% of the probe, paired by round: an entry's rate ÷ the probe taken right before it, the median over "
        "the rounds; a model's 4 products together: per round, the time the probe takes to read their bytes "
        "÷ the time they took, the median over the rounds.",
        "",
    ]
    if meta["others_busy_max"] > BUSY:
        md += [
            f"⚠ other processes used up to {meta['others_busy_max']:.0%} of the CPUs during this run. Their memory "
            "traffic slows the probe and the kernels alike, and a 2-thread call whose second thread is "
            "descheduled waits a time slice (a median of ~12 ms reads as 0.0x in the last table): rerun on "
            "an idle machine.",
            "",
        ]
    md += ceiling_check(meta, rows)
    if meta["working_set_mib"] < MIN_COLD_MIB:
        md += [
            f"⚠ working set {meta['working_set_mib']:.0f} MiB < {MIN_COLD_MIB} MiB: weights may be served by the LLC.",
            "",
        ]
    # the summary: per dtype and n, a model's four products together, against the target
    md += [
        "## Summary: % of the read probe (a model's 4 products together), 1 thread",
        "",
        "| dtype | model | " + " | ".join(f"n = {n}" for n in NS) + " | target |",
        "| --- | --- |" + " ---: |" * len(NS) + " ---: |",
    ]
    for dt in dict.fromkeys(r["dtype"] for r in rows):
        for mod in dict.fromkeys(r["model"] for r in rows):
            cells = []
            for n in NS:
                rs = [r for r in rows if r["dtype"] == dt and r["model"] == mod and r["n"] == n]
                pct = (
                    paired_pct([(r["bytes"], r["samples_1t"], r["probe_samples_1t"]) for r in rs])
                    if rs
                    else None
                )
                miss = dt in TARGETS and pct is not None and pct < TARGETS[dt]
                cells.append(
                    "–" if pct is None else f"{'**' if miss else ''}{pct:.0f}%{'**' if miss else ''}"
                )
            md.append(
                f"| {dt} | {mod} | "
                + " | ".join(cells)
                + (f" | ≥ {TARGETS[dt]:.0f}% |" if dt in TARGETS else " | – |")
            )
    md += ["", "Bold: below the target.", ""]
    # per layer: GB/s, % of probe, time vs dense (n = 0) of the same shape and dtype
    md += [
        "## Per layer, 1 thread: GB/s (% of the read probe), time of dense ÷ time of the class",
        "",
        "| model | layer (out × in) | dtype | " + " | ".join(f"n = {n}" for n in NS) + " |",
        "| --- | --- | --- |" + " ---: |" * len(NS),
    ]
    for mod in dict.fromkeys(r["model"] for r in rows):
        for layer in dict.fromkeys(r["layer"] for r in rows if r["model"] == mod):
            for dt in dict.fromkeys(r["dtype"] for r in rows):
                rs = {
                    r["n"]: r for r in rows if r["model"] == mod and r["layer"] == layer and r["dtype"] == dt
                }
                if not rs:
                    continue
                r0 = next(iter(rs.values()))
                cells = [
                    f"{rs[n]['gbs_1t']:.1f} ({rs[n]['pct_probe_1t']:.0f}%), {rs[n]['speedup_vs_dense']:.2f}×"
                    if n in rs
                    else "–"
                    for n in NS
                ]
                md.append(
                    f"| {mod} | {layer} ({r0['out']} × {r0['inn']}) | {dt} | " + " | ".join(cells) + " |"
                )
    two = [r for r in rows if "seconds_2t" in r]
    if two:
        md += [
            "",
            f"## 2 threads vs 1 (time 1T ÷ time 2T; target ≥ {THREADS_TARGET}×)",
            "",
            "| model | dtype | " + " | ".join(f"n = {n}" for n in NS) + " | per layer (n = 0 .. 3) |",
            "| --- | --- |" + " ---: |" * len(NS) + " --- |",
        ]
        for mod in dict.fromkeys(r["model"] for r in two):
            for dt in dict.fromkeys(r["dtype"] for r in two):
                rs = [r for r in two if r["model"] == mod and r["dtype"] == dt]
                if not rs:
                    continue
                agg = []
                for n in NS:
                    rn = [r for r in rs if r["n"] == n]
                    agg.append(
                        f"{sum(r['seconds_1t'] for r in rn) / sum(r['seconds_2t'] for r in rn):.2f}×"
                        if rn
                        else "–"
                    )
                per = "; ".join(
                    f"{layer} " + " ".join(f"{r['speedup_2t']:.2f}" for r in rs if r["layer"] == layer)
                    for layer in dict.fromkeys(r["layer"] for r in rs)
                )
                md.append(f"| {mod} | {dt} | " + " | ".join(agg) + f" | {per} |")
        if "2" in meta["probe_gbs"]:
            md += ["", f"Read probe 2T ÷ 1T: {meta['probe_gbs']['2'] / p1:.2f}×."]
    md.append("")
    return "\n".join(md)


def write_all(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    (out / "kernels.md").write_text(markdown(meta, rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sparsamba.runtime.engine import ISAS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="1 round of ~20 ms per entry (default: 3 of ~50 ms), 2 threads in f16 only",
    )
    ap.add_argument("--models", default="130m,370m", help="layer shapes of: 130m,370m")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="any of f16,int8,f32")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument(
        "--reps", type=int, default=None, help="calls per entry and round (default: ~50 ms of them)"
    )
    ap.add_argument(
        "--isa", default="auto", choices=list(ISAS), help="kernel family (auto: what the CPU has)"
    )
    ap.add_argument("--no-two-threads", dest="two_threads", action="store_false", help="skip 2 threads vs 1")
    ap.add_argument("--probe-mib", type=int, default=512, help="buffer of the read probe")
    ap.add_argument(
        "--idle-wait",
        type=float,
        default=30,
        help="before each group of entries, wait up to this many seconds for the CPUs to go idle",
    )
    ap.add_argument(
        "--layout",
        type=int,
        choices=(1, 2),
        default=None,
        help="byte count of this packed format (default: the checkout's)",
    )
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results"), help="folder for kernels.{json,md}"
    )
    a = ap.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else argv
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.models = machine.csv_choices(ap, a.models, SHAPES, "model shape")
    a.dtypes = machine.csv_choices(ap, a.dtypes, DTYPES, "dtype")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    meta, rows = run(a)
    if meta["working_set_mib"] < MIN_COLD_MIB:
        log(
            f"WARNING: the profiler's working set is {meta['working_set_mib']:.0f} MiB (< {MIN_COLD_MIB} MiB)"
        )
    write_all(Path(a.out), meta, rows)
    print()
    print(markdown(meta, rows))
    log(f"done in {meta['seconds']:.0f} s: {a.out}/kernels.md")


if __name__ == "__main__":
    main()
