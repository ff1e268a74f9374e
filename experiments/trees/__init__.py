"""Experiments on the tree-crown data (neon-trees): training runs under a CPU budget, not benchmarks."""
