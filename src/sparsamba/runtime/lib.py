"""The engine's shared library and every prototype of its C ABI (``src/engine/sparsamba.h``), declared
once here: ``runtime/engine.py`` and ``runtime/profile.py`` call ``library()`` and nothing else declares
a signature. A function the header adds gets its line in ``PROTOTYPES``.

The library is libsparsamba, the same file an app links (it exports only the header's ``sb_*``
functions): the package ships one plain ``libsparsamba.so``, a standalone CMake build the versioned
``libsparsamba.so.<ABI>``."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from ..errors import SparsambaError

LIB_NAME = {"darwin": "libsparsamba.dylib", "win32": "sparsamba.dll"}.get(sys.platform, "libsparsamba.so")


class Info(ctypes.Structure):
    """sb_info"""

    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "vocab_size",
            "d_model",
            "n_layer",
            "d_inner",
            "d_state",
            "dt_rank",
            "d_conv",
            "dtype",
            "tied_head",
            "norm_folded",
            "format_version",
        )
    ] + [("file_bytes", ctypes.c_int64), ("weight_bytes", ctypes.c_int64)]


_P, _PP, _STR, _SIZE = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t
_I32, _I64, _DP = ctypes.c_int32, ctypes.c_int64, ctypes.POINTER(ctypes.c_double)
_ERR = [_STR, _SIZE]  # every fallible call ends with (char *err, size_t errlen)

# name -> (restype, argtypes), in sparsamba.h's order
PROTOTYPES: dict[str, tuple] = {
    "sb_version": (_STR, []),
    "sb_abi_version": (_I32, []),
    "sb_check_version": (ctypes.c_int, [_I32, _I32, _I32, *_ERR]),
    "sb_model_load": (ctypes.c_int, [_STR, _PP, *_ERR]),
    "sb_model_free": (None, [_P]),
    "sb_model_info": (None, [_P, ctypes.POINTER(Info)]),
    "sb_model_arch": (_I32, [_P, ctypes.POINTER(_I32), ctypes.POINTER(_I32)]),
    "sb_state_new": (ctypes.c_int, [_P, _PP, *_ERR]),
    "sb_state_reset": (None, [_P]),
    "sb_state_free": (None, [_P]),
    "sb_forward": (ctypes.c_int, [_P, _P, _P, _I32, _P, _I32, *_ERR]),
    "sb_set_threads": (_I32, [_I32]),
    "sb_set_isa": (_I32, [_I32]),
    "sb_isa_name": (_STR, []),
    "sb_bench": (ctypes.c_int, [_P, _I32, _I32, _I32, _DP, _DP, *_ERR]),
    "sb_read_bandwidth": (ctypes.c_double, [_I64, _I32]),
    "sb_profile_linear": (ctypes.c_int, [_I32, _I32, _I32, _I32, _I32, _DP, *_ERR]),
    "sb_profile_model": (ctypes.c_int, [_P, _I32, _DP, *_ERR]),
    "sb_profile_decode": (ctypes.c_int, [_P, _I32, _DP, _DP, _DP, *_ERR]),
    "sb_profile_release": (None, []),
    "sb_backend_open": (ctypes.c_int, [_P, _I32, _I32, _PP, *_ERR]),
    "sb_backend_free": (None, [_P]),
    "sb_backend_reset": (ctypes.c_int, [_P, *_ERR]),
    "sb_backend_forward": (ctypes.c_int, [_P, _P, _I32, _P, _I32, *_ERR]),
    "sb_backend_name": (_STR, [_P]),
    "sb_opencl_devices": (ctypes.c_int, [_STR, _SIZE, *_ERR]),
    "sb_tokenizer_load": (ctypes.c_int, [_P, _PP, *_ERR]),
    "sb_tokenizer_free": (None, [_P]),
    "sb_tokenizer_n_vocab": (_I32, [_P]),
    "sb_token_bos": (_I32, [_P]),
    "sb_token_eos": (_I32, [_P]),
    "sb_tokenize": (ctypes.c_int, [_P, _P, _SIZE, _P, _I32, _P, *_ERR]),
    "sb_detokenize": (ctypes.c_int, [_P, _P, _I32, _P, _SIZE, _P, *_ERR]),
    "sb_token_piece": (ctypes.c_int, [_P, _I32, _P, _P]),
    "sb_stream_new": (ctypes.c_int, [_P, _PP, *_ERR]),
    "sb_stream_push": (ctypes.c_int, [_P, _I32, _P, _P, *_ERR]),
    "sb_stream_flush": (_SIZE, [_P, _P]),
    "sb_stream_free": (None, [_P]),
    "sb_gen_defaults": (None, [_P]),
    "sb_generate": (ctypes.c_int, [_P, _P, _P, _I32, _P, _P, _P, _P, _P, *_ERR]),
    "sb_backend_model": (_P, [_P]),
}


def _candidates(name: str = LIB_NAME, env: str = "SPARSAMBA_ENGINE_LIB", sub: str = "") -> list[Path]:
    """Where the build put ``name`` (the library, or ``sparsamba-run`` in ``bin``)."""
    if os.environ.get(env):
        return [Path(os.environ[env])]
    import sparsamba

    # an installed wheel keeps the library inside the package; an editable install may spread the
    # package over several folders (its __path__), and a source checkout built by hand keeps it
    # in build/engine
    dirs = [Path(p) for p in getattr(sparsamba, "__path__", [])] + [Path(__file__).parents[1]]
    root = Path(__file__).resolve().parents[3]
    return [d / sub / name for d in dirs] + [root / "build" / "engine" / name]


def standalone() -> Path:
    """The path of ``sparsamba-run``, the engine as a program with no Python (installed inside the
    package; ``SPARSAMBA_RUN`` overrides)."""
    tried = _candidates("sparsamba-run", "SPARSAMBA_RUN", "bin")
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise SparsambaError(
            f"sparsamba-run is not built: looked in {', '.join(str(p.parent) for p in tried)}. "
            "Reinstall the package (pip install -e .), which builds it with CMake"
        )
    return path


def run_standalone() -> None:
    """The ``sparsamba-run`` command on PATH: runs the bundled program with the same arguments."""
    try:
        exe = standalone()
    except SparsambaError as e:
        print(f"sparsamba-run: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    os.execv(exe, [str(exe), *sys.argv[1:]])


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The loaded engine library, every prototype declared (loaded once). A symbol an older build lacks
    is left undeclared: its caller says what to rebuild (``profile._lib``)."""
    global _lib
    if _lib is not None:
        return _lib
    tried = _candidates()
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise SparsambaError(
            f"the native engine ({LIB_NAME}) is not built: looked in {', '.join(str(p.parent) for p in tried)}. "
            "Reinstall the package (pip install -e .), which builds it with CMake, or set SPARSAMBA_ENGINE_LIB"
        )
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = restype, argtypes
    from .. import __version__

    built = lib.sb_version().decode() if hasattr(lib, "sb_version") else "an older one (no sb_version)"
    if built != __version__:  # a library left from another checkout or an old build
        raise SparsambaError(
            f"the native engine {path} is version {built}, the package {__version__}: reinstall the package "
            "(pip install -e .), which rebuilds it"
        )
    _lib = lib
    return lib


def error_buffer() -> ctypes.Array:
    """the (char *err, size_t errlen) buffer the fallible calls write their message into"""
    return ctypes.create_string_buffer(1024)
