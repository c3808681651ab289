"""What every command shares: a stage's config loaded from YAML, flags and TRL's names, and the command
generated from it. Above the library's other packages: it knows every stage's config."""
