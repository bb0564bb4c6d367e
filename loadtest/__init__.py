"""Benchmarks: baseline and treatment measured in the same run, one JSON object printed last."""
