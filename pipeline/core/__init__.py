"""Foundations every layer uses: errors, atomic outputs, locks, file names, schemas, devices, progress."""
