"""Evaluation: retrieval metrics (and, later, zero-shot classification)."""
