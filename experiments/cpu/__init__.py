"""CPU kernel measurements that explain the benchmark figures (benchmarks/NOTES.md, CPU section)."""
