"""Quantized checkpoints: AWQ's int4 format, its loader and the layer that keeps it packed."""
