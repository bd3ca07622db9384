"""kvstore.benchmarks (see DESIGN.md)."""
