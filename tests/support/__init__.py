"""Test doubles and helpers the tests share: a real server in a subprocess (``servers``), the same
server with faults wired in (``fault_server``), upstreams that misbehave (``misbehaving_upstream``),
a stand-in for ``vllm serve`` (``vllm_standin``), tiny random-weight models (``tiny_models``) and a
reader of server-sent events (``sse``)."""
