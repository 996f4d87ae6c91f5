"""Pruning: sparsity patterns, masks and per-weight scores (pure numerics), and the passes that apply them."""
