"""Evaluation: task metrics and scoring a model on a split."""
