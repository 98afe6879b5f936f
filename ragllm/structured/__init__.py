"""Structured outputs: what a request constrains its answer to (``spec``), the grammars that enforce
it over the model's tokenizer (``grammars``) and the token masks the sampler applies (``masks``)."""
