"""Fused GWQ dequant-GEMM-outlier Triton kernels.

* :mod:`gwq_compile.codegen.kernels`: the ``@triton.jit`` tile programs (GEMV/split-K
  for small M, tiled ``tl.dot`` GEMM for large M), their autotune configs and pruners.
* :mod:`gwq_compile.codegen.launch`: the thin launcher
  :func:`~gwq_compile.codegen.launch.gwq_linear_triton` (called by
  ``torch.ops.gwq.linear`` when ``GWQ_KERNEL=triton``, or on CUDA by default) and the
  ``torch.ops.gwq.linear_triton`` triton_op that Inductor can see into.

Importing this package does nothing: no triton import, no GPU query.  ``launch`` needs
only torch to import; triton is imported when a kernel is first launched.
"""
