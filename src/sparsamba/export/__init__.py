"""The same weights as plain GGUF files that other runtimes read (llama.cpp's `mamba` / `mamba2`)."""
