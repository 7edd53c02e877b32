"""Benchmarks of the bridge, each figure beside a floor measured in the same run (``make bench``)."""
