"""Flax NNX modules: thickness models and the hybrid model."""
