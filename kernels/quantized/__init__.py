"""Kernel family 'quantized' (being written; see its issue). Exports nothing yet."""
