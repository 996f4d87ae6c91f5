"""Latency tables measured by the engine on the machine where it runs (``sparsamba profile``).

For every prunable layer shape (out, in) of a model and every n in 0..3, the engine builds a synthetic
layer whose rows all remove n weights per group of 4 (random valid codes) in the compile dtype, and
times its decode product (``sb_profile_linear`` in ``src/engine/profile.c``): the active kernels, the
thread count given, the same ``sb_linear_vec`` path a decode step runs, and weights spread over a working
set of max(64 MiB, 2 × the LLC of one core) so that each call reads them from memory, as decode does.
The median over the repetitions goes into the ``sparsamba.latency`` v1 table (``prune/latency.py``):
``seconds`` is the whole layer at that n, a row costs seconds / out, and a row at n = 4 is never read,
so it costs 0.

``measure_layers`` times the same products of a compiled model (``sb_profile_model``: every prunable
layer of every block in decode order, caches flushed before each pass) — the figure that
``predicted_latency`` (the table summed over the pruned model's rows) claims to predict.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

from .. import formats
from ..errors import SparsambaError
from ..model.names import LINEARS
from ..outputs import check_output, write_file_atomically
from .lib import error_buffer, library

GGUF_NAMES = tuple(LINEARS["mamba"])  # sb_profile_model's order within a block
DEVICES = ("cpu", "opencl")


def _lib() -> ctypes.CDLL:
    """The engine library (``runtime/lib.py`` declares the prototypes), refused when it predates profiling."""
    lib = library()
    if not hasattr(lib, "sb_profile_linear"):
        raise SparsambaError(
            "the native engine was built before profiling existed (no sb_profile_linear); "
            "rebuild it: pip install -e . --no-deps"
        )
    return lib


def release() -> None:
    """Free the profiler's working set (kept between calls: faulting it in again costs more than a
    measurement)."""
    _lib().sb_profile_release()


def profile_linear(
    out: int, inn: int, n: int, dtype: str = "f16", reps: int = 100, threads: int | None = None
) -> float:
    """Median seconds of one decode product of an (out, inn) layer with every row at n (0..3), weights
    cold, on the engine's current kernels and ``threads`` (None: the current, process-wide count)."""
    from .engine import EngineError

    code = formats.get(dtype).ggml_type
    lib = _lib()
    if threads is not None:
        if threads <= 0:
            raise SparsambaError(f"threads must be positive, got {threads}")
        lib.sb_set_threads(threads)
    sec = ctypes.c_double()
    err = error_buffer()
    if lib.sb_profile_linear(out, inn, n, code, reps, ctypes.byref(sec), err, len(err)):
        raise EngineError(err.value.decode(errors="replace"))
    return sec.value


def default_reps(out: int, inn: int, n: int, dtype: str, budget_s: float = 0.05) -> int:
    """Repetitions filling about ``budget_s`` at a guessed 10 GB/s: many for a small layer, whose
    median needs them, few for a large one (30 to 2000)."""
    kept = (4 - n) * math.ceil(inn / 4)
    guess = out * (kept * formats.get(dtype).value_bytes + (kept // 4 if n else 0) + 4) / 10e9 + 1e-6
    return max(30, min(2000, int(budget_s / guess)))


def _model_and_config(model_or_config):
    """(a module whose prunable layers give the shapes, its config): a loaded model, a config, a model
    directory or hub id, or None for the embedded model. A config builds on the meta device: no weights."""
    import torch
    from torch import nn

    from .. import assets
    from ..model.hf import build_model, read_config, resolve

    if isinstance(model_or_config, nn.Module):
        return model_or_config, getattr(model_or_config, "config", None)
    cfg = model_or_config
    if cfg is None or isinstance(cfg, str | os.PathLike):
        cfg = read_config(resolve(cfg if cfg is not None else assets.DEFAULT_MODEL))
    with torch.device("meta"):
        return build_model(cfg), cfg


def prunable_shapes(model_or_config=None) -> dict[str, tuple[int, int]]:
    """Prunable layer name -> (out, in), in forward order."""
    from ..prune.calibrate import prunable_layers

    model, _ = _model_and_config(model_or_config)
    return {name: (m.out_features, m.in_features) for block in prunable_layers(model) for name, m in block}


def _default_threads(shapes: dict[str, tuple[int, int]], cfg, dtype: str) -> int:
    """The thread count ``Engine`` picks for this model: 1 below SMALL_MODEL_BYTES, else all cores."""
    from .engine import SMALL_MODEL_BYTES

    head = getattr(cfg, "vocab_size", 0) * getattr(cfg, "hidden_size", 0)
    nbytes = (sum(o * i for o, i in shapes.values()) + head) * formats.get(dtype).value_bytes
    return 1 if nbytes < SMALL_MODEL_BYTES else 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and val.strip():
                return val.strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def profile_table(
    model_or_config=None,
    dtype: str = "f16",
    threads: int | None = None,
    reps: int | None = None,
    device: str = "cpu",
    rounds: int = 5,
    log=None,
) -> dict:
    """Measure every (layer shape, n = 0..3) of the model's prunable layers with the engine; the
    ``sparsamba.latency`` v1 table (n = 4 costs 0) with the machine, threads, dtype and kernels.

    ``threads``: None = what ``Engine`` would use for this model (1 under 16 MiB, else all cores);
    ``reps``: None = about 50 ms of calls per entry (``default_reps``); every entry is measured in
    ``rounds`` interleaved rounds and the median kept, so that a neighbour's burst of load on a shared
    machine lands on one round of every entry rather than on all of one entry."""
    from .. import __version__

    if device not in DEVICES:
        raise SparsambaError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device != "cpu":
        raise SparsambaError(
            f"--device {device}: not available — the profiler times the CPU kernels only; the OpenCL "
            "backend (Engine(device='opencl')) has no per-layer timing entry yet. Profile with --device cpu"
        )
    formats.get(dtype)
    if threads is not None and threads <= 0:
        raise SparsambaError(f"threads must be positive, got {threads}")
    if reps is not None and reps <= 0:
        raise SparsambaError(f"reps must be positive, got {reps}")
    if rounds <= 0:
        raise SparsambaError(f"rounds must be positive, got {rounds}")
    model, cfg = _model_and_config(model_or_config)
    shapes = prunable_shapes(model)
    lib = _lib()  # a stale library fails here, before any work
    threads = lib.sb_set_threads(_default_threads(shapes, cfg, dtype) if threads is None else threads)
    kernels = lib.sb_isa_name().decode()
    keys = [(out, inn, n) for out, inn in sorted(set(shapes.values())) for n in range(4)]
    times: dict[tuple, list[float]] = {k: [] for k in keys}
    t0 = time.time()
    try:
        for _ in range(rounds):
            for out, inn, n in keys:
                times[out, inn, n].append(
                    profile_linear(out, inn, n, dtype, reps or default_reps(out, inn, n, dtype))
                )
    finally:
        release()
    entries = []
    for out, inn, n in keys:
        s = statistics.median(times[out, inn, n])
        entries.append({"out": out, "in": inn, "n": n, "seconds": s})
        if log:
            log(f"profile ({out}, {inn}) n={n} {dtype}: {s * 1e6:.2f} us")
        if n == 3:
            entries.append({"out": out, "in": inn, "n": 4, "seconds": 0.0})
    return {
        "format": "sparsamba.latency",
        "version": 1,
        "source": "measured",
        "device": f"cpu: {cpu_name()} ({platform.machine()}), {kernels}, {threads} thread{'s' * (threads > 1)}",
        "dtype": dtype,
        "unit": "s",
        "machine": {
            "cpu": cpu_name(),
            "arch": platform.machine(),
            "system": platform.system(),
            "cores": os.cpu_count(),
        },
        "threads": threads,
        "kernels": kernels,
        "method": "median time of a decode product, weights cold (working set max(64 MiB, 2 x LLC))",
        "reps": reps or "auto (~50 ms per entry)",
        "rounds": rounds,
        "layers": {name: list(s) for name, s in shapes.items()},
        "sparsamba_version": __version__,
        "profile_seconds": round(time.time() - t0, 2),
        "entries": entries,
    }


def write_table(table: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write a latency table as JSON atomically (a temporary sibling renamed into place)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")

    return write_file_atomically(check_output(path, overwrite, file=True), write)


# ---------------------------------------------------------------------------------------------
# what the table predicts, and what the engine measures


def layer_ns(model) -> dict:
    """name -> (out, in, n removed per row (out,)) of a (pruned) model, for ``expected_latency``."""
    from ..prune.calibrate import prunable_layers
    from ..prune.pattern import removed_per_row

    return {
        name: (m.out_features, m.in_features, removed_per_row(m.weight.detach()))
        for block in prunable_layers(model)
        for name, m in block
    }


def predicted_latency(table: dict, model) -> float:
    """Σ over prunable layers and rows of the table's cost of the row's n (seconds per token)."""
    from ..prune.latency import expected_latency

    return expected_latency(table, layer_ns(model))


def measure_layers(engine, reps: int = 200) -> dict[str, float]:
    """Median seconds of each prunable product of a compiled model (``blk.i.ssm_in``, ...), on the
    engine's thread count, each pass over the model starting from flushed caches. The working set is
    kept for the next call: ``release()`` frees it."""
    from .engine import EngineError

    if reps <= 0:
        raise SparsambaError(f"reps must be positive, got {reps}")
    lib = _lib()
    L = engine.info.n_layer
    out = (ctypes.c_double * (4 * L))()
    err = error_buffer()
    lib.sb_set_threads(engine.threads)
    if lib.sb_profile_model(engine.model_handle, reps, out, err, len(err)):
        raise EngineError(err.value.decode(errors="replace"))
    return {f"blk.{i}.{GGUF_NAMES[j]}": out[4 * i + j] for i in range(L) for j in range(4)}


# sb_profile_decode's stages, in its order (src/engine/engine.h SB_ST_*): a block's row, then the
# row of the embedding lookup, final norm and head
BLOCK_STAGES = ("norm", "in_proj", "conv", "x_proj", "prep", "dt_proj", "scan", "out_proj")
N_STAGES = 10
HEAD_STAGES = {0: "final_norm", 8: "embedding", 9: "head"}


def decode_stages(engine, n_tokens: int = 32) -> dict:
    """Where one decode step's time goes (``sb_profile_decode``): mean seconds per token of each stage
    of each block (``blocks[i][stage]``) and of the embedding lookup, final norm and head (``top``), the
    bytes each product read (``bytes``, same keys), and the wall ``total`` per step. The team syncs
    at the end of every stage while this runs, which is its only overhead."""
    from .engine import EngineError

    if n_tokens <= 0:
        raise SparsambaError(f"n_tokens must be positive, got {n_tokens}")
    lib = _lib()
    L = engine.info.n_layer
    sec = (ctypes.c_double * ((L + 1) * N_STAGES))()
    nb = (ctypes.c_double * ((L + 1) * N_STAGES))()
    total = ctypes.c_double()
    err = error_buffer()
    lib.sb_set_threads(engine.threads)
    if lib.sb_profile_decode(engine.model_handle, n_tokens, sec, nb, ctypes.byref(total), err, len(err)):
        raise EngineError(err.value.decode(errors="replace"))
    blocks = [{s: sec[i * N_STAGES + j] for j, s in enumerate(BLOCK_STAGES)} for i in range(L)]
    blocks_b = [{s: nb[i * N_STAGES + j] for j, s in enumerate(BLOCK_STAGES)} for i in range(L)]
    top = {s: sec[L * N_STAGES + j] for j, s in HEAD_STAGES.items()}
    top_b = {s: nb[L * N_STAGES + j] for j, s in HEAD_STAGES.items()}
    return {"blocks": blocks, "top": top, "bytes": {"blocks": blocks_b, "top": top_b}, "total": total.value}


def stages_table(r: dict) -> str:
    """``decode_stages``' result as a markdown table: each stage summed over the blocks, its share of the
    step, and for the products the bytes read per second."""
    rows: dict[str, list[float]] = {}
    for b, nb in zip(r["blocks"], r["bytes"]["blocks"]):
        for k, v in b.items():
            t = rows.setdefault(k, [0.0, 0.0])
            t[0] += v
            t[1] += nb[k]
    for k, v in r["top"].items():
        rows[k] = [v, r["bytes"]["top"][k]]
    total = r["total"]
    lines = ["| stage | ms / token | share | GB/s |", "| --- | ---: | ---: | ---: |"]
    for k, (t, nb) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        if t == 0 and not nb:  # a stage this architecture has not (Mamba-2: x_proj, dt_proj)
            continue
        gbs = f"{nb / t / 1e9:.1f}" if nb and t > 0 else ""
        lines.append(f"| {k} | {t * 1e3:.3f} | {t / total:.1%} | {gbs} |")
    gbs = sum(v[1] for v in rows.values()) / total / 1e9
    lines.append(f"| step (wall) | {total * 1e3:.3f} | 100% | {gbs:.1f} |")
    return "\n".join(lines)
