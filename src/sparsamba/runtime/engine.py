"""The native engine from Python: a thin ctypes layer over the C ABI in ``src/engine/sparsamba.h``.

``Engine(path)`` maps a packed GGUF (``sparsamba compile``), validates it in C and keeps one
sequence's recurrent state. Errors from the C side (a bad file, a token outside the vocabulary)
arrive as :class:`EngineError` with the C side's message.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SparsambaError
from ..formats import by_ggml_type
from .lib import Info, error_buffer, library

ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 5, "neon": 3}
DEVICES = {"cpu": 0, "opencl": 1}  # SB_BACKEND_CPU, SB_BACKEND_OPENCL
# below this many bytes of weights per token, the default is one thread: OpenMP's fork and barriers
# cost more than they save (and a busy second core makes them cost milliseconds)
SMALL_MODEL_BYTES = 16 << 20


class EngineError(SparsambaError):
    """An error reported by the native engine."""


@dataclass(frozen=True)
class EngineInfo:
    vocab_size: int
    d_model: int
    n_layer: int
    d_inner: int
    d_state: int
    dt_rank: int
    d_conv: int
    dtype: str
    tied_head: bool
    norm_folded: bool
    format_version: int
    file_bytes: int
    weight_bytes: int  # matrix bytes read per decoded token
    arch: int = 1  # 1 Mamba-1 (sparsamba.mamba), 2 Mamba-2 (sparsamba.mamba2; dt_rank 0)
    n_head: int = 0  # Mamba-2: heads (head_dim = d_inner / n_head); 0 for Mamba-1
    n_group: int = 0  # Mamba-2: B/C groups


def set_isa(isa: str) -> str:
    """Force a kernel family ("auto", "scalar", "avx2", "avx512", "neon"); returns the name of the one in effect
    (a family the CPU lacks falls back to scalar). Process-wide, as in the C library."""
    if isa not in ISAS:
        raise SparsambaError(f"unknown kernel family {isa!r}; use one of {', '.join(ISAS)}")
    lib = library()
    lib.sb_set_isa(ISAS[isa])
    return lib.sb_isa_name().decode()


def read_bandwidth(mib: int = 512, threads: int = 1, reps: int = 5) -> float:
    """Memory read bandwidth in bytes/s, measured by the engine (best of ``reps`` passes over a
    ``mib`` MiB buffer on ``threads`` threads): the denominator of the decode roofline."""
    lib = library()
    lib.sb_set_threads(threads)
    bw = lib.sb_read_bandwidth(mib << 20, reps)
    if bw < 0:
        raise SparsambaError(f"cannot allocate {mib} MiB to measure the memory bandwidth")
    return bw


_err = error_buffer


@dataclass(frozen=True)
class OpenCLDevice:
    index: int  # the device_index of Engine(..., device="opencl")
    platform: str
    name: str
    type: str  # GPU, CPU, accelerator
    version: str
    fp16: bool  # cl_khr_fp16: half arithmetic for f16 models (else float compute, half storage)
    global_mem_bytes: int


def opencl_devices() -> list[OpenCLDevice]:
    """Every OpenCL device of every platform, in the engine's order. Raises :class:`EngineError` with
    the reason when there is none (no libOpenCL, no platform, no device, built without OpenCL)."""
    lib = library()
    out, err = ctypes.create_string_buffer(1 << 16), _err()
    if lib.sb_opencl_devices(out, len(out), err, len(err)):
        raise EngineError(err.value.decode(errors="replace"))
    devs = []
    for line in out.value.decode(errors="replace").splitlines():
        i, plat, name, typ, ver, fp16, mem = line.split("\t")
        devs.append(OpenCLDevice(int(i), plat, name, typ, ver, fp16 == "1", int(mem)))
    return devs


class Engine:
    """A packed model and one sequence's state.

    ``logits(tokens)`` scores a sequence from a fresh state; ``prefill`` / ``decode`` continue the
    state; ``generate`` continues a prompt. ``threads`` (default: all cores, or 1 for a model under
    16 MiB) is process-wide, as OpenMP's setting is.

    One Engine may be shared by threads: each call holds the engine's lock, so calls from several
    threads run one after another on the one state (give each thread its own Engine to run them side
    by side). Every method after :meth:`close` (or the ``with`` block) raises ``SparsambaError``.

    ``device="opencl"`` runs the same computation on OpenCL device ``device_index`` (see
    :func:`opencl_devices`; -1: the first GPU, else the first device). When it cannot (no OpenCL, no
    device, a kernel build failure, too little device memory) that is an :class:`EngineError`, unless
    ``fallback=True``: then a ``RuntimeWarning`` says why and the engine runs on the CPU
    (``self.device`` says where it runs)."""

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        device: str = "cpu",
        device_index: int = -1,
        fallback: bool = False,
    ):
        self._lock = threading.RLock()
        self._backend = None
        self._model = None
        lib = library()
        self._lib = lib
        self.path = Path(path)
        if threads is not None:
            check_threads(threads)
        if device not in DEVICES:
            raise SparsambaError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        self.device = device
        err = _err()
        model = ctypes.c_void_p()
        if lib.sb_model_load(os.fsencode(self.path), ctypes.byref(model), err, len(err)):
            raise EngineError(err.value.decode(errors="replace"))
        self._model = model
        raw = Info()
        lib.sb_model_info(model, ctypes.byref(raw))
        fields = {k: getattr(raw, k) for k, _ in Info._fields_}
        fields["dtype"] = by_ggml_type(fields["dtype"])
        fields["tied_head"] = bool(fields["tied_head"])
        fields["norm_folded"] = bool(fields["norm_folded"])
        heads, groups = ctypes.c_int32(), ctypes.c_int32()
        fields["arch"] = lib.sb_model_arch(model, ctypes.byref(heads), ctypes.byref(groups))
        fields["n_head"], fields["n_group"] = heads.value, groups.value
        self.info = EngineInfo(**fields)
        if threads is None:  # a model of a few MB is done before a second thread has started
            threads = 0 if self.info.weight_bytes >= SMALL_MODEL_BYTES else 1
        self.threads = lib.sb_set_threads(threads)
        self._tokenizer = None
        # every device, the CPU included, runs behind the backend API (src/engine/backend.c)
        backend = ctypes.c_void_p()
        if lib.sb_backend_open(model, DEVICES[device], device_index, ctypes.byref(backend), err, len(err)):
            msg = err.value.decode(errors="replace")
            if device == "cpu" or not fallback:
                self.close()
                raise EngineError(msg)
            warnings.warn(f"{msg}; running on the CPU instead (fallback=True)", RuntimeWarning, stacklevel=2)
            self.device = "cpu"
            if lib.sb_backend_open(model, DEVICES["cpu"], -1, ctypes.byref(backend), err, len(err)):
                self.close()
                raise EngineError(err.value.decode(errors="replace"))
        self._backend = backend

    @property
    def model_handle(self) -> ctypes.c_void_p:
        """The ``sb_model *`` of the C ABI (``runtime/lib.py``), for calls that take the model itself
        (``sb_bench``, ``sb_profile_model``); valid until :meth:`close`."""
        self._check_open()
        return self._model

    @property
    def kernels(self) -> str:
        """What runs the model: the CPU kernel family, or the OpenCL device's description."""
        with self._lock:
            self._check_open()
            return self._lib.sb_backend_name(self._backend).decode(errors="replace")

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        # the C side takes these handles as given: a freed one would be a use-after-free, NULL a crash
        if getattr(self, "_model", None) is None or getattr(self, "_backend", None) is None:
            raise SparsambaError(f"{self.path}: this Engine is closed; open the model again with Engine(path)")

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before the lock existed: nothing was allocated
            return
        with lock:
            if getattr(self, "_backend", None):
                self._lib.sb_backend_free(self._backend)
                self._backend = None
            if getattr(self, "_model", None):
                self._lib.sb_model_free(self._model)
                self._model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ compute
    def _forward(self, tokens: Sequence[int], mode: int) -> np.ndarray | None:
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise SparsambaError(f"tokens must be a 1-D sequence of ids, got shape {ids.shape}")
        if ids.size == 0:
            raise SparsambaError("no tokens given; the prompt must hold at least one token")
        if ids.dtype.kind not in "iu":  # 1.7 or True is no token id, and casting would hide it
            raise SparsambaError(f"token ids must be integers, got {ids.dtype} values such as {ids.flat[0]!r}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.min() < -(2**31) or ids.max() >= 2**31:
            raise SparsambaError(f"token ids must fit in int32 (vocabulary size {self.info.vocab_size})")
        ids32 = ids.astype(np.int32)
        V = self.info.vocab_size
        out = None if mode == 0 else np.empty((ids.size if mode == 2 else 1, V), dtype=np.float32)
        err = _err()
        logits = None if out is None else out.ctypes.data
        with self._lock:
            self._check_open()
            rc = self._lib.sb_backend_forward(
                self._backend, ids32.ctypes.data, ids32.size, logits, mode, err, len(err)
            )
        if rc:
            raise EngineError(err.value.decode(errors="replace"))
        return out

    def reset(self) -> None:
        """Back to the empty state (before any token)."""
        err = _err()
        with self._lock:
            self._check_open()
            if self._lib.sb_backend_reset(self._backend, err, len(err)):
                raise EngineError(err.value.decode(errors="replace"))

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens`` from the current state; the last position's logits, (V,)."""
        return self._forward(tokens, 1)[0]

    def decode(self, token: int) -> np.ndarray:
        """One more token; its logits, (V,)."""
        return self._forward([token], 1)[0]

    def logits(self, tokens: Sequence[int], all_positions: bool = True) -> np.ndarray:
        """Logits from a fresh state: (T, V) for every position, or (V,) for the last one."""
        with self._lock:  # the reset and the forward as one step for other threads
            self.reset()
            return self._forward(tokens, 2) if all_positions else self._forward(tokens, 1)[0]

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        eos_token_id: int | None = None,
        on_token=None,
    ) -> list[int]:
        """New token ids after ``prompt`` (fresh state): greedy when ``temperature`` is 0, else
        sampled from softmax(logits / temperature), over the ``top_k`` most likely if top_k > 0.
        ``on_token(id)`` is called as each token is chosen (streaming output)."""
        check_sampling(max_new_tokens, temperature, top_k)
        rng = np.random.default_rng(seed)
        with self._lock:  # one sequence: no other thread's call may move the state in between
            self.reset()
            logits = self.prefill(prompt)
            out: list[int] = []
            for i in range(max_new_tokens):
                tok = _pick(logits, temperature, top_k, rng)
                out.append(tok)
                if on_token is not None:
                    on_token(tok)
                if (eos_token_id is not None and tok == eos_token_id) or i + 1 == max_new_tokens:
                    break
                logits = self.decode(tok)
        return out

    def bench(self, n_prompt: int = 128, n_gen: int = 64, reps: int = 5) -> dict[str, list[float]]:
        """llama-bench's pp / tg protocol timed inside the engine: tokens/s for each repetition (the CPU
        engine's, whatever the device)."""
        for name, v in (("n_prompt", n_prompt), ("n_gen", n_gen), ("reps", reps)):
            if not isinstance(v, int) or v <= 0:
                raise SparsambaError(f"{name} must be a positive integer, got {v!r}")
        pp = (ctypes.c_double * reps)()
        tg = (ctypes.c_double * reps)()
        err = _err()
        with self._lock:
            if self._lib.sb_bench(self.model_handle, n_prompt, n_gen, reps, pp, tg, err, len(err)):
                raise EngineError(err.value.decode(errors="replace"))
        return {"pp": list(pp), "tg": list(tg)}

    # ------------------------------------------------------------------ text
    def tokenizer(self):
        """The model's tokenizer, rebuilt from the tokenizer.json the compiler stored in the file."""
        if self._tokenizer is None:
            from ..gguf_io import load_gguf_tokenizer

            self._tokenizer = load_gguf_tokenizer(self.path)
        return self._tokenizer


def max_threads() -> int:
    """The most threads an engine takes: 4 per core this process may use. More only wait on each
    other (and libgomp's stacks overflow near 100000)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 4 * max(cores, 1)


def check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= max_threads():
        raise SparsambaError(
            f"threads must be a whole number from 1 to {max_threads()} (4 per core here), got {threads!r}"
        )
    return threads


def check_sampling(max_new_tokens, temperature, top_k) -> None:
    """One clear error for each sampling setting out of range (a NaN temperature included)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise SparsambaError(f"number of tokens to generate must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise SparsambaError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SparsambaError(f"top-k must be a whole number >= 0 (0 = all tokens), got {top_k!r}")


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    lg = logits.astype(np.float64) / temperature
    if top_k > 0 and top_k < lg.size:
        kth = np.partition(lg, -top_k)[-top_k]
        lg = np.where(lg < kth, -np.inf, lg)
    p = np.exp(lg - lg.max())
    return int(rng.choice(lg.size, p=p / p.sum()))
