"""Benchmarks (`mdmt bench ...`): figures and ratios printed, never asserted in tests."""
