"""sparsamba: C_4^n sparse Mamba language models, small and fast enough for phones."""

from .errors import SparsambaError
from .model.hf import load_model, load_tokenizer, save_model

__version__ = "0.1.0"
__all__ = ["SparsambaError", "load_model", "load_tokenizer", "save_model", "__version__"]
