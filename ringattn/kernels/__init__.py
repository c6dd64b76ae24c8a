"""Hand-written kernels (Triton) for the memory-bound steps around the attention kernels.

Each has a plain-torch twin that computes the same thing; the caller picks the kernel only where
it can run (CUDA, or CPU under ``TRITON_INTERPRET=1``) and outside ``torch.compile`` (Inductor
fuses the torch twin itself).
"""
