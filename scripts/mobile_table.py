"""docs/mobile.md's phone table: bytes each decoded token reads, and the decode speed that memory
bandwidth allows (the roofline) on published phone memory systems, beside the x86 figures measured here.

    python scripts/mobile_table.py           # rewrite the table in docs/mobile.md
    python scripts/mobile_table.py --check   # exit 1 when the table in docs/mobile.md is stale

Computed, not measured: bytes per token from the compiler's size model (packed_v2.matrix_bytes, the
blob sizes write_packed stores) for every tensor of the packed file, at the published Mamba-1 shapes and
the row mixes of bench/models.py (no weights are made: a blob's size depends only on its shape and its
rows per n); llama.cpp's from ggml's block sizes, with the tensor types llama-quantize chose for 130m
(read from its files). Tokens/s = bandwidth ÷ bytes per token (every tensor once, the tied embedding
once more as the head, plus the looked-up row): bench/speed.py's roofline without the recurrent state,
which it also counts (Mamba-1's is ~2% of the f16 weights, and may stay in a phone's last-level cache).
Measured: the x86 columns, read from bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package
import machine  # noqa: E402
import models  # noqa: E402

from sparsamba.compile.packed_v2 import DTYPES, matrix_bytes  # noqa: E402

DOC = ROOT / "docs" / "mobile.md"
SPEED = ROOT / "bench" / "results" / "speed.json"
KERNELS = ROOT / "bench" / "results" / "kernels.json"
BEGIN, END = "<!-- mobile_table: begin -->", "<!-- mobile_table: end -->"

# Peak bandwidth = transfer rate × bus width. The memory type and rate are the published figures (the
# source); the 64-bit bus (4 × 16-bit LPDDR5/5X channels) is an assumption where the source gives no
# peak, stated in the table.
SOCS = [
    dict(
        name="Snapdragon 8 Gen 2",
        memory="LPDDR5X 4200 MHz (8400 MT/s)",
        mts=8400,
        source="https://droidholic.com/snapdragon-8-gen-3-launched/",
    ),
    dict(
        name="Snapdragon 8 Gen 3",
        memory="LPDDR5X 4800 MHz (9600 MT/s)",
        mts=9600,
        source="https://droidholic.com/snapdragon-8-gen-3-launched/",
    ),
    dict(
        name="Dimensity 9300",
        memory="LPDDR5T 9600 MT/s",
        mts=9600,
        stated_gbs=76.8,
        source="https://iosandwebtechnologies.com/sk-hynix-begins-shipping-the-first-batch-of-lpddr5t-for-smartphones-to-be-adopted-in-dimensity-9300-devices-first/",
    ),
    dict(
        name="Apple A17 Pro",
        memory="LPDDR5 (reported), assumed at LPDDR5's top rate, 6400 MT/s",
        mts=6400,
        source="https://www.mactrast.com/2023/09/new-report-says-apples-iphone-15-pro-to-feature-up-to-8gb-ram-1tb-storage/ "
        "(LPDDR5); https://fobis.id/news/iphone-15-pro-menggunakan-ram-lpddr5/ (LPDDR5's 6400 Mbps)",
    ),
]
BUS_BITS = 64
# assumptions, not measurements: the share of peak one big core's loads reach, and all cores'
CORE_FRACTION, ALL_FRACTION = 0.30, 0.60

# ggml's bytes per block and values per block
GGML = {"F32": (4, 1), "F16": (2, 1), "Q8_0": (34, 32), "Q4_0": (18, 32), "Q6_K": (210, 256)}


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layer: int
    vocab: int = 50280
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.d_model / 16)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each prunable projection of a block, by its GGUF name"""
        di, r, n = self.d_inner, self.dt_rank, self.d_state
        return {
            "ssm_in": (2 * di, self.d_model),
            "ssm_x": (r + 2 * n, di),
            "ssm_dt": (di, r),
            "ssm_out": (self.d_model, di),
        }

    def small(self) -> dict[str, int]:
        """elements of a block's other tensors, all fp32 in both files (the packed file folds
        attn_norm into ssm_in; llama.cpp keeps it)"""
        di = self.d_inner
        return {
            "ssm_conv1d.weight": self.d_conv * di,
            "ssm_conv1d.bias": di,
            "ssm_dt.bias": di,
            "ssm_a": self.d_state * di,
            "ssm_d": di,
        }


def shape_of(name: str) -> Shape:
    s = models.SHAPES[name]
    c = models.COMMON
    return Shape(
        s["hidden_size"],
        s["num_hidden_layers"],
        c["vocab_size"],
        c["state_size"],
        c["expand"],
        c["conv_kernel"],
    )


def rows_by_n(out: int, mix: dict[int, float]) -> dict[int, int]:
    """rows per n by the largest remainder of mix · out (bench/models.py's rule)"""
    if not mix:
        return {0: out}
    ns = sorted(mix)
    exact = [mix[n] * out for n in ns]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(ns)), key=lambda i: counts[i] - exact[i])[: out - sum(counts)]:
        counts[i] += 1
    return dict(zip(ns, counts))


def packed_sizes(shape: Shape, dtype: str, mix: dict[int, float]) -> dict[str, int]:
    """bytes of every tensor of the packed GGUF (packed_gguf.tensors_of's list)"""
    dt = DTYPES[dtype]
    sizes = {"token_embd.v2": matrix_bytes(shape.d_model, dt, {0: shape.vocab})}
    for i in range(shape.n_layer):
        for k, (out, n_in) in shape.linears().items():
            sizes[f"blk.{i}.{k}.v2"] = matrix_bytes(n_in, dt, rows_by_n(out, mix))
        for k, n in shape.small().items():
            sizes[f"blk.{i}.{k}"] = 4 * n
    sizes["output_norm.weight"] = 4 * shape.d_model
    return sizes


def ggml_bytes(ggml_type: str, n: int) -> int:
    b, per = GGML[ggml_type]
    return n // per * b


def llamacpp_sizes(shape: Shape, ftype: str) -> dict[str, int]:
    """bytes of every tensor of llama.cpp's GGUF of the same model in ftype (F16, Q8_0, Q4_0): the types
    llama-quantize gave 130m's tensors (bench/gguf/130m-*.gguf): the projections in ftype where their
    rows split into whole blocks (else F16: 130m's ssm_dt, 48 inputs), the tied embedding Q8_0 for Q8_0
    and Q6_K for Q4_0 (its rule for the output matrix), the rest F32"""
    emb = {"F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q6_K"}[ftype]
    sizes = {"token_embd.weight": ggml_bytes(emb, shape.vocab * shape.d_model)}
    for i in range(shape.n_layer):
        sizes[f"blk.{i}.attn_norm.weight"] = 4 * shape.d_model
        for k, (out, n_in) in shape.linears().items():
            t = ftype if n_in % GGML[ftype][1] == 0 else "F16"
            sizes[f"blk.{i}.{k}.weight"] = ggml_bytes(t, out * n_in)
        for k, n in shape.small().items():
            sizes[f"blk.{i}.{k}"] = 4 * n
    sizes["output_norm.weight"] = 4 * shape.d_model
    return sizes


def bytes_per_token(sizes: dict[str, int], vocab: int) -> int:
    emb = [k for k in sizes if k.startswith("token_embd.")]
    return machine._bytes_per_token(sizes, emb, vocab, tied=True)


# (label, engine, dtype as speed.json names it, sparsity)
FORMATS = [
    ("ours f32, dense", "sparsamba", "f32", 0.0),
    ("ours f16, dense", "sparsamba", "f16", 0.0),
    ("ours f16, C_4^n 50%", "sparsamba", "f16", 0.5),
    ("ours f16, C_4^n 70%", "sparsamba", "f16", 0.7),
    ("ours int8, C_4^n 50%", "sparsamba", "int8", 0.5),
    ("ours int8, C_4^n 70%", "sparsamba", "int8", 0.7),
    ("llama.cpp F16, dense", "llama.cpp", "f16", 0.0),
    ("llama.cpp Q8_0, dense", "llama.cpp", "q8_0", 0.0),
    ("llama.cpp Q4_0, dense", "llama.cpp", "q4_0", 0.0),
]


def computed(shape_name: str, engine: str, dtype: str, sparsity: float) -> int:
    shape = shape_of(shape_name)
    if engine == "sparsamba":
        sizes = packed_sizes(shape, dtype, models.MIXES[sparsity] if sparsity else {})
    else:
        sizes = llamacpp_sizes(shape, dtype.upper())
    return bytes_per_token(sizes, shape.vocab)


def measured_rows() -> dict[tuple, dict]:
    """speed.json's rows by (engine, shape, dtype, sparsity, threads)"""
    rows = json.loads(SPEED.read_text())["rows"]
    return {(r["engine"], r["shape"], r["dtype"], round(r["sparsity"], 1), r["threads"]): r for r in rows}


def table(core: float = CORE_FRACTION, everything: float = ALL_FRACTION) -> str:
    meas = measured_rows()
    meta = json.loads(SPEED.read_text())["meta"]
    peaks = [s.get("stated_gbs", s["mts"] * BUS_BITS / 8 / 1e3) * 1e9 for s in SOCS]
    probe = json.loads(KERNELS.read_text())["meta"]["probe_gbs"]
    ours = [
        r["roofline_pct"] for k, r in meas.items() if k[0] == "sparsamba" and k[4] == 1 and r["roofline_pct"]
    ]
    measured_shapes = ", ".join(sorted({x.split()[1] for x in check_against_measured()}))
    worst = max(abs(float(x.rsplit("(", 1)[1].rstrip("%)"))) for x in check_against_measured())
    head = ["shape", "format", "MiB read per token (computed)", "x86 here: tg t/s 1T / 2T (measured)"]
    head += [f"{s['name']}: t/s 1 core / all cores" for s in SOCS]
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---", "---"] + ["---:"] * (len(head) - 2)) + " |",
    ]
    for shape in models.SHAPES:
        for label, engine, dtype, sp in FORMATS:
            b = computed(shape, engine, dtype, sp)
            got = [meas.get((engine, shape, dtype, sp, t)) for t in (1, 2)]
            x86 = " / ".join(f"{r['tg64_tps']:.1f}" for r in got) if all(got) else "not run"
            cells = [shape, label, f"{b / 2**20:.1f}", x86]
            cells += [f"{p * core / b:.0f} / {p * everything / b:.0f}" for p in peaks]
            lines.append("| " + " | ".join(cells) + " |")
    bw = meta["bandwidth"]["used"]
    state = ", ".join(
        f"{sh.n_layer} × {sh.d_inner} × {sh.d_state} fp32 = {4 * sh.n_layer * sh.d_inner * sh.d_state / 2**20:.2f} MiB for {k}"
        for k, sh in ((k, shape_of(k)) for k in models.SHAPES)
    )
    socs = []
    for s, p in zip(SOCS, peaks):
        how = (
            "stated by the source" if "stated_gbs" in s else f"computed: {s['mts']} MT/s × {BUS_BITS}-bit bus"
        )
        socs.append(f"- {s['name']}: {s['memory']} → peak {p / 1e9:.1f} GB/s ({how}); {s['source']}")
    return f"""{BEGIN}
Generated by `python scripts/mobile_table.py` (do not edit by hand).

| | |
| --- | --- |
| computed | bytes per token (the compiler's size model at the published shapes; llama.cpp's from ggml's block sizes), every phone column |
| measured | the x86 column: `{meta["command"]}` on {meta["machine"]["cpu"]} ({meta["machine"]["cores"]} cores), read bandwidth {float(bw["1"]):.1f} GB/s 1T / {float(bw["2"]):.1f} GB/s 2T (bench/results/speed.md; the engine's own read probe {probe["1"]:.1f} / {probe["2"]:.1f} GB/s, bench/results/kernels.md) |
| assumed | one core reaches {core:.0%} of a phone's peak bandwidth, all cores {everything:.0%}; the 64-bit memory bus where a source gives no peak |

{chr(10).join(lines)}

Phone t/s = peak × fraction ÷ bytes per token: an upper bound that also assumes the kernels run at
the speed of memory (here on x86 ours reach {min(ours):.0f}–{max(ours):.0f}% of the measured-bandwidth roofline at 1 thread,
bench/results/speed.md), and leaves out the recurrent state ({state}, read and written each token; it
may stay in a phone's last-level cache).
Sparse rows mix n per row as bench/models.py does (50%: 25% c4n1 + 50% c4n2 + 25% c4n3; 70%: 20% c4n2 +
80% c4n3). The computed bytes agree with those of the files bench/speed.py measured ({measured_shapes}) within
{worst:.3f}% (there a few Δ rows move to make the sparsity exact). Peak bandwidths:
{chr(10).join(socs)}
{END}"""


def check_against_measured() -> list[str]:
    """computed bytes per token beside speed.json's (read from the real files), for the Mamba-1 shapes
    it measured"""
    out = []
    for (engine, shape, dtype, sp, threads), r in sorted(measured_rows().items()):
        # the table is of the Mamba-1 shapes (speed.json may hold Mamba-2 rows too)
        if (
            threads != 1
            or shape not in models.SHAPES
            or (engine, dtype, sp) not in {(e, d, s) for _, e, d, s in FORMATS}
        ):
            continue
        c = computed(shape, engine, dtype, sp)
        out.append(
            f"{engine} {shape} {dtype} {sp:.0%}: computed {c:,} measured {r['bytes_per_token']:,} ({c / r['bytes_per_token'] - 1:+.3%})"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/mobile.md's table is stale")
    ap.add_argument(
        "--print", action="store_true", help="print the table and the check against the files; write nothing"
    )
    a = ap.parse_args(argv)
    if a.print:
        print(table())
        print("\n".join(check_against_measured()))
        return 0
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"{DOC}: no {BEGIN} ... {END} markers to put the table between", file=sys.stderr)
        return 1
    new = text[: text.index(BEGIN)] + table() + text[text.index(END) + len(END) :]
    if a.check:
        if new != text:
            print(
                "docs/mobile.md's phone table is stale: run python scripts/mobile_table.py", file=sys.stderr
            )
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
