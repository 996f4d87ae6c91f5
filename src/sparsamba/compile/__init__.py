"""The compiler: an HF-format Mamba-1 (dense, or pruned to C_4^n with exact zeros) -> one packed GGUF
(docs/packed-format.md) that the native engine runs. Passes over a plan, a verifier between them."""

from .compiler import CompileReport, compile_model, summarize
from .packed_gguf import read_packed, write_packed
from .passes import fold_layouts, fuse, pack, reorder
from .plan import Plan, plan_from_model
from .sizes import plan_sizes, size_table
from .verify import plan_forward

__all__ = [
    "CompileReport",
    "Plan",
    "compile_model",
    "fold_layouts",
    "fuse",
    "pack",
    "plan_forward",
    "plan_from_model",
    "plan_sizes",
    "read_packed",
    "reorder",
    "size_table",
    "summarize",
    "write_packed",
]
