"""Helpers shipped for tests and benchmarks, never imported by the service: random-weight checkpoints
of real architectures (``random_checkpoints``)."""
