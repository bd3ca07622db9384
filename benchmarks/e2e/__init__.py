"""End-to-end benchmarks inside real engines (kvstore.benchmarks.e2e)."""
