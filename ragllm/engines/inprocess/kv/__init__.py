"""The KV cache in blocks: allocation, sharing and the prefix cache (``blocks``), each sequence's
block table on the device (``block_tables``) and the paged tensors themselves (``paged_cache``)."""
