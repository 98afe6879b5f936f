"""``vllm serve`` started and supervised by us (``supervisor``), its flags from our settings
(``flags``), then used as an upstream (``engine``)."""
