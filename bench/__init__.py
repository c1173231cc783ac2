"""Benchmarks (`make bench`, `make bench-model`): numbers to read and compare as ratios, never pass/fail tests."""
