"""LLaDA's sampler and completions in memory; preference pairs from a model's own graded samples."""
