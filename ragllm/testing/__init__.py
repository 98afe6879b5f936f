"""Helpers shipped for tests and benchmarks, never imported by the service: random-weight checkpoints
of real architectures (``random_checkpoints``), and routing policies run over modelled vLLM replicas
on virtual time (``routing_simulation``, ``routing_policies``, ``replica_model``)."""
