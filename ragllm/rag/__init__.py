"""Retrieval-augmented generation: the contract a RAG request speaks and what the service does with it.

- ``contract``: the wire models (typed documents and options in, the ``rag`` report out).
- ``prompt``: templates as data (``templates/<name>.toml``), the documents' canonical order, rendering
  them and the question into messages.
- ``packing``: as many top-ranked documents as the model's context holds, counted with its tokenizer.
- ``document_set``: a set of documents' key, whatever their order or scores (replica affinity).
- ``citations``: the ``[id]`` marker, read out of answers and, when asked for, enforced while decoding.
"""
