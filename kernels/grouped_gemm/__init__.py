"""Kernel family 'grouped_gemm' (being written; see its issue). Exports nothing yet."""
