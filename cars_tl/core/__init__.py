"""Foundations every layer uses: errors, progress reporting, atomic files, locks, runtime and torchrun."""
