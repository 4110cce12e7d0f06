"""Evaluation: tasks and metrics, the side-by-side speed/quality benchmark, the (E, d) sweep, the
per-layer early-exit analysis, the cost model, and their plots. Uses only the public decoding API."""
