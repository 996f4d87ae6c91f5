"""Measuring a model: text data and windows, perplexity, generation, lm-eval zero-shot tasks."""
