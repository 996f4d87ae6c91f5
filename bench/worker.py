"""One engine configuration, timed in a process of its own so that its peak RSS is its own.

    python bench/worker.py transformers MODEL_DIR --threads T --reps R
    python bench/worker.py sparsamba PACKED.gguf --threads T --reps R
    python bench/worker.py bandwidth --mib 512          # numpy / torch / the read probe side by side
    python bench/worker.py probe --mib 512 --threads T  # the read probe alone: {"gbs": GB/s}

Prints one JSON object on the last line of stdout: {"pp": [t/s per rep], "tg": [...], "rss_base_kib": ...,
"isa": ...}. ``isa`` is the SIMD family that ran the products: the engine's kernels (``Engine.kernels``:
avx2, scalar, ...) or torch's CPU capability (its ATen kernels, AVX2 / AVX512 / DEFAULT).
``rss_base_kib`` is the process's peak RSS after its imports and before it loads any weights (the
Python + torch floor), so a reader can tell the model's share of the parent-measured peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

N_PROMPT, N_GEN = 128, 64
DECODE_PROMPT = 4  # "decode after a short prompt": Mamba's step cost does not depend on the position


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def transformers_bench(model_dir: str, threads: int, reps: int) -> dict:
    """transformers' MambaForCausalLM (Mamba2ForCausalLM for a mamba2 directory), fp32 on the CPU (its sequential reference path: no CUDA kernels).

    pp: one forward over tokens 0..127 from a fresh cache, logits of the last position only (as
    llama-bench's prompt batch asks for); tg: 64 greedy steps with the cache, after a 4-token prompt.
    One untimed warm-up of each first, as llama-bench does.
    """
    import torch
    from transformers import Mamba2ForCausalLM, MambaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # "fast path not available" is expected on a CPU
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # a decaying SSM state would otherwise crawl through denormals
    base = _peak_kib()
    m2 = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == "mamba2"
    cls = Mamba2ForCausalLM if m2 else MambaForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()

    def prefill() -> float:
        ids = torch.arange(N_PROMPT)[None] % model.config.vocab_size
        t = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return N_PROMPT / (time.perf_counter() - t)

    def decode(n: int) -> float:
        out = model(input_ids=torch.arange(DECODE_PROMPT)[None], use_cache=True, logits_to_keep=1)
        cache, tok = out.cache_params, out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        t = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=tok, cache_params=cache, use_cache=True)
            cache, tok = out.cache_params, out.logits[:, -1].argmax(-1, keepdim=True)
        return n / (time.perf_counter() - t)

    with torch.inference_mode():
        prefill()
        decode(8)
        pp = [prefill() for _ in range(reps)]
        tg = [decode(N_GEN) for _ in range(reps)]
    return dict(pp=pp, tg=tg, rss_base_kib=base, isa=f"torch {torch.backends.cpu.get_cpu_capability()}")


def sparsamba_bench(path: str, threads: int, reps: int) -> dict:
    """Our engine; the timing loop is its own (in C): pp over tokens 0..127 from a fresh state, then
    tg64 with the state carried."""
    from sparsamba.runtime.engine import Engine

    base = _peak_kib()
    eng = Engine(path, threads=threads)
    try:
        r = eng.bench(n_prompt=N_PROMPT, n_gen=N_GEN, reps=reps)
        isa = eng.kernels
    finally:
        eng.close()
    return dict(pp=list(r["pp"]), tg=list(r["tg"]), rss_base_kib=base, isa=isa)


# ----------------------------------------------------------------------------------------------
# Memory read bandwidth, for the roofline


def bandwidth(mib: int, reps: int, threads_list: list[int]) -> dict:
    """Read bandwidth (GB/s) of a ``mib`` MiB float32 array for each thread count T, by three read-only
    kernels: numpy sum and numpy max (single-threaded each; T threads = T Python threads on T slices,
    numpy releases the GIL) and torch sum (its own pool of T threads). Each figure is the fastest of
    ``reps``: other processes and timer noise only ever make a read slower, never faster.

    Several kernels because a reduction can be compute-bound below the memory's speed (numpy's
    pairwise float32 sum is, on some CPUs); the roofline uses the fastest, the bandwidth a decoder
    that does nothing but stream weights could reach.
    """
    import threading

    import numpy as np
    import torch

    n = mib * 2**20 // 4
    a = np.random.default_rng(0).random(n, dtype=np.float32)  # written: every page really mapped
    t_a = torch.from_numpy(a)

    def split(f, T: int) -> Callable[[], None]:
        parts = np.array_split(a, T)

        def run() -> None:
            th = [threading.Thread(target=f, args=(p,)) for p in parts]
            for t in th:
                t.start()
            for t in th:
                t.join()

        return run if T > 1 else lambda: f(a)

    out: dict[str, dict[str, float]] = {}
    for T in threads_list:
        torch.set_num_threads(T)
        res = {}
        for name, f in (
            ("numpy_sum", split(np.sum, T)),
            ("numpy_max", split(np.max, T)),
            ("torch_sum", t_a.sum),
        ):
            f()  # warm-up
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            res[name] = a.nbytes / min(ts) / 1e9
        try:  # the read probe, the roofline's denominator (bench/README.md)
            from sparsamba.runtime.engine import read_bandwidth

            res["engine_read_probe"] = read_bandwidth(mib, T, reps) / 1e9
        except Exception:  # an engine that is not built: the other kernels still give a roofline
            pass
        out[str(T)] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["transformers", "sparsamba", "bandwidth", "probe"])
    ap.add_argument("path", nargs="?")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)  # bandwidth: 10 or more
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--threads-list", default="1,2")
    a = ap.parse_args()
    if a.kind == "probe":  # the read probe alone (no numpy / torch pages in the way)
        from sparsamba.runtime.engine import read_bandwidth

        r = dict(gbs=read_bandwidth(a.mib, a.threads, a.reps) / 1e9)
    elif a.kind == "bandwidth":
        r = bandwidth(a.mib, a.reps, [int(t) for t in a.threads_list.split(",")])
    elif a.kind == "transformers":
        r = transformers_bench(a.path, a.threads, a.reps)
    else:
        r = sparsamba_bench(a.path, a.threads, a.reps)
    sys.stdout.flush()
    print(json.dumps(r))


if __name__ == "__main__":
    main()
