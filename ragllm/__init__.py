"""rag-llm-service: an OpenAI-compatible completion service built for retrieval-augmented generation."""

__version__ = "0.1.0"
