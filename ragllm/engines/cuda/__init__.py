"""The in-process engine's CUDA path, one noun per module: the runner, the weights it fuses, the KV
memory budget, the fused kernels, paged attention, and the decode and prefill graphs."""
