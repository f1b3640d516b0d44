"""GWQ Triton kernels, one file per job.

* :mod:`gwq_compile.codegen.unpack`: the one ``@triton.jit`` unpack/dequantize helper
  (bit planes -> ``(code - zero) * scale`` tiles) every kernel family calls.
* :mod:`gwq_compile.codegen.gemv`: small M (decode): the fused GEMV / split-K kernel,
  outliers read per tile, with its candidate configs and default.
* :mod:`gwq_compile.codegen.dequant`: large M (prefill): one kernel writes the dense
  weight, outliers included, for cuBLAS; with its configs.
* :mod:`gwq_compile.codegen.launch`: the thin launcher
  :func:`~gwq_compile.codegen.launch.gwq_linear_triton` (called by ``torch.ops.gwq.linear``
  when ``GWQ_KERNEL=triton``, or on CUDA by default), the once-per-shape config choice,
  and the ``torch.ops.gwq.linear_triton`` triton_op that Inductor can see into.

Importing this package does nothing: no triton import, no GPU query.  ``launch`` needs
only torch to import; triton is imported when a kernel is first launched.
"""
