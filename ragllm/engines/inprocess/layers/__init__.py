"""Device kernels of the CUDA path: fused elementwise kernels (``kernels``), paged attention
(``attention``) and int4 AWQ matrix products (``w4a16``)."""
