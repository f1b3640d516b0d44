"""FX passes of the ``gwq`` torch.compile backend, one stage per module, run in this order:

1. :mod:`~gwq_compile.passes.capture`: find every linear in the graph (``F.linear``,
   ``addmm``/``mm``/``matmul`` against ``t(W)``, HF ``Conv1D``'s ``addmm``).
2. :mod:`~gwq_compile.passes.calibrate`: once per *model* (never per subgraph or
   recompile), whole-model forward+backward for the gradient saliency, then the same
   selection and packing as eager ``quantize_``.
3. :mod:`~gwq_compile.passes.annotate`: ``node.meta["gwq"]`` = outlier mask and grid of
   each captured linear whose weight was quantized, in this graph's calibration or before
   (a ``GWQTensor`` parameter: every later graph, or a model quantized before compiling).
4. :mod:`~gwq_compile.passes.rewrite`: each annotated linear becomes
   ``torch.ops.gwq.linear`` on packed weights held as GraphModule buffers.

:mod:`gwq_compile.compile_backend` chains them and hands the graph to Inductor.  Each stage counts
what it did in ``torch._dynamo.utils.counters["gwq"]``.

Example:
    >>> from gwq_compile.passes import capture_linears, calibrate_model, annotate_linears, rewrite_linears
"""

from gwq_compile.passes.annotate import GWQAnnotation, annotate_linears, input_value, unquantizable_weights
from gwq_compile.passes.calibrate import (
    ModelCall,
    ModelQuantization,
    QuantizedLayer,
    calibrate_model,
    find_model_call,
    model_quantization,
)
from gwq_compile.passes.capture import LinearSite, capture_linears, weights_with_other_uses
from gwq_compile.passes.rewrite import guard_baked_weights, rewrite_linears

__all__ = [
    "GWQAnnotation",
    "LinearSite",
    "ModelCall",
    "ModelQuantization",
    "QuantizedLayer",
    "annotate_linears",
    "calibrate_model",
    "capture_linears",
    "find_model_call",
    "guard_baked_weights",
    "input_value",
    "model_quantization",
    "rewrite_linears",
    "unquantizable_weights",
    "weights_with_other_uses",
]
