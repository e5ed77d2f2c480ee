"""Structural channel pruning over torch-pruning: the core and the METHODS registry."""
