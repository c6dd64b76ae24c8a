"""Kernels around the attention kernels, and the attention kernels' launch paths.

* Triton kernels for the memory-bound steps (``merge``, ``add``, ``unselected``, ``dpsum``):
  each has a plain-torch twin that computes the same thing; the caller picks the kernel only
  where it can run (CUDA, or CPU under ``TRITON_INTERPRET=1``) and outside ``torch.compile``
  (Inductor fuses the torch twin itself).
* Launch paths of library kernels: ``cudnn_graphs`` (NVIDIA's cuDNN frontend, the ``cuda``
  extra), ``fa4`` and ``replay`` (FlashAttention-4 and its recorded launches, the ``fa4``
  extra), ``fa4_merge`` / ``fa4_merge_sm90`` (FA4's forward merging ``lse`` blocks in its
  epilogue), ``fa4_zero`` / ``fa4_zero_sm90`` (FA4's forward writing the zeros of the rows a
  ``head_groups`` config leaves out) and ``fa4_add`` (FA4's backward adding dK, dV with TMA
  reduce-add stores, and dQ in its postprocess, ``fa4_group_bwd_sm90.AddingPostprocessSm90``)
  and ``fa4_dpsum`` (FA4's backward taking each row's dPsum as given, formed once for all
  ``lse`` configs by ``dpsum``). Each is
  optional and guarded: where it cannot run, or its first call disagrees with the plain path,
  the caller takes the plain path, which computes the same function.
"""
