"""Benchmarks and analyses that are also reachable from the CLI."""
