"""The reference-score cache: its fingerprint, manifest and part files, written by score-ref and read by train and eval."""
