"""Tool calling: the request's tools (``request``), how a model family writes its calls
(``formats``), tools and tool turns in the prompt (``rendering``), calls read back out of the answer
as it streams (``parsing``, ``stream``) and their wire forms (``calls``)."""
