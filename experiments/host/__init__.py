"""Host-side measurements on CPU tensors: what the Python around the op costs, and what the benchmark's error
metric sees (benchmarks/NOTES.md, the first GPU measurement)."""
