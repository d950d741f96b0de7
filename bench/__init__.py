"""Benchmarks of the platform (`make bench`); results go to docs/benchmarks.md."""
