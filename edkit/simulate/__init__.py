"""Simulation: frame set-up (beam tables, Klar selection), frame stacks, patterns, synthetic
data."""
