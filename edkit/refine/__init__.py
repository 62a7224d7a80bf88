"""Losses, figures of merit, refinable parameters and the Refinement driver."""
