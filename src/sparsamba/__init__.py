"""sparsamba: C_4^n sparse Mamba language models, small and fast enough for phones.

Names are imported on first use (PEP 562), so that ``sparsamba.Engine`` — the native engine, numpy
and ctypes only — starts without paying for torch, which the pruner and the compiler need."""

from .errors import SparsambaError

__version__ = "0.1.0"
_LAZY = {
    "Engine": ".runtime.engine",
    "compile_model": ".compile",
    "load_model": ".model.hf",
    "load_tokenizer": ".model.hf",
    "save_model": ".model.hf",
}
__all__ = ["SparsambaError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
