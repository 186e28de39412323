"""The GPU fast path: Triton kernels for 4-bit decode, a Llama-family decoder that runs its
decode step as one CUDA graph, and GPU image preprocessing. Imported only when CUDA is used."""
