"""Benchmarks behind ``muse bench``: each prints measured numbers and ratios and can write JSON."""
