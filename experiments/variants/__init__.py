"""Kernel variants the probes time against ringattn's own (CuTe DSL classes: imported only where
FlashAttention-4 and the CUTLASS DSL are, so not scripts; ``experiments/fa4_probe.py`` loads
them): ``fa4_merge``, the LSE merge's epilogue with parts taken out (``--part merge_cost``)."""
