"""The allowed values of GWQ's user-facing options, importable without torch or torchao.

The ``gwq`` command builds its parser (and ``gwq --help``) from these, so it starts in a
fraction of a second; :class:`gwq_compile.GWQConfig` and :mod:`gwq_tools.eval` validate
against the same tuples.
"""

SALIENCY_CHOICES = ("grad", "fisher", "grad_weight", "grad_error", "hessian")
SCOPE_CHOICES = ("layer", "row", "model")
COMPENSATION_CHOICES = ("none", "gptq", "gptq_act")
STEP_CHOICES = (None, "prepare", "convert")
CLIP_SEARCH_NAMES = ("none", "mse", "act_mse", "mse_wls", "act_wls")  # as the CLI spells them (GWQConfig also takes True/False)
DATASETS = ("wikitext2", "c4", "text")  # evaluation texts (gwq eval --dataset)
LOADERS = ("plain", "datasets")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
