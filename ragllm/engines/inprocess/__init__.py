"""The in-process engine: our own continuous-batching engine over a transformers model, on the CPU or
CUDA. ``engine`` is the seam's implementation; ``scheduler`` decides what each step runs,
``sequence`` is one request's state, ``sample/`` turns logits into tokens (masks, choice, scores),
``kv/`` holds the paged KV blocks and prefix cache, ``runner/`` runs the model (CPU, CUDA and its
graphs), ``layers/`` the fused kernels and attention, ``quantized/`` AWQ checkpoints."""
