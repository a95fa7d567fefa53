"""Benchmarks: speed and memory against the base model and PEFT, measured in one run."""
