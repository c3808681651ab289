"""Reading and validating what users bring: preference pairs, prompts, SFT examples, choices; tokenization."""
