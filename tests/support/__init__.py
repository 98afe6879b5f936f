"""Test doubles and helpers the tests share: a real server in a subprocess (``servers``), the same
server with faults wired in (``fault_server``), upstreams that misbehave (``misbehaving_upstream``),
a stand-in for ``vllm serve`` (``vllm_standin``), request bodies a hostile client sends
(``hostile_bodies``), OpenAI's response schemas (``openai_schema``), tiny random-weight models
(``tiny_models``), a tiny model served by the real worker with a one-letter-a-token tokenizer
(``letter_model``), block tables laid out by hand (``block_tables``), a SentencePiece-style tokenizer
(``sentencepiece_tokenizer``) and a reader of server-sent events (``sse``)."""
