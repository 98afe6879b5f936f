"""Structured outputs: what a request constrains its answer to (``spec``), the grammars that enforce
it over the model's tokenizer (``grammars``, bounded by ``parser_limits``, kept in ``grammar_cache``).
The token masks the in-process engine applies live with its sampling (``engines/inprocess/sample``)."""
