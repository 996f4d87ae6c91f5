"""Readable PyTorch references of Mamba-1 and Mamba-2, and HF-format loading."""
