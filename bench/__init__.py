"""Benchmarks and evaluations: python -m bench.latency, bench.long_ppl, bench.endless."""
