"""Running the model over the paged KV cache: ``cpu`` (the reference runner, transformers' modules
with our attention core), ``cuda`` (the fused path), its weights, memory budget and the decode and
prefill graphs it replays."""
