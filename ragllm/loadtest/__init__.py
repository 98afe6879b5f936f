"""The load tester behind ``ragllm loadtest``: the ``workload`` it sends, the ``generator`` that sends
it level by level, the ``report`` of each level (JSON, comparison) and its ``plot`` (PNG)."""
