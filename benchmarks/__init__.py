"""Benchmarks of the package, each a script that prints a table and writes JSON: ``python -m benchmarks.<name>``."""
