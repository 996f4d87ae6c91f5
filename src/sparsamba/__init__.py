"""sparsamba: C_4^n sparse Mamba language models, small and fast enough for phones."""

from .compile import compile_model  # adds ~50 ms to the torch import already paid
from .errors import SparsambaError
from .model.hf import load_model, load_tokenizer, save_model

__version__ = "0.1.0"
__all__ = ["SparsambaError", "compile_model", "load_model", "load_tokenizer", "save_model", "__version__"]
