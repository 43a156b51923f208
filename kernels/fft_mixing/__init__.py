"""Kernel family 'fft_mixing' (being written; see its issue). Exports nothing yet."""
