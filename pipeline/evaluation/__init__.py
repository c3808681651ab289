"""Judging a model: held-out preference metrics, intervals, eval records, the lm-eval-harness model."""
