"""Load generator and baselines: `rnnserve bench`. Figures go to docs/BENCHMARKS.md."""
