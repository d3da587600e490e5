"""Evaluation: generation metrics and batched prediction."""
