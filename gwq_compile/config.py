"""``GWQConfig``: the validated description of one GWQ quantization.

It is a torchao ``AOBaseConfig``, so ``torchao.quantization.quantize_(model, GWQConfig(...))``
dispatches to the handler registered in :mod:`gwq_compile.quantize`.

Example:
    >>> from gwq_compile import GWQConfig
    >>> GWQConfig(bits=3, group_size=64, outlier_ratio=0.01).bits
    3
    >>> GWQConfig(bits=5)
    Traceback (most recent call last):
    ...
    ValueError: GWQConfig.bits must be an int, one of (2, 3, 4, 8), got 5
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Optional

from torchao.core.config import AOBaseConfig

from gwq_compile.options import COMPENSATION_CHOICES, SALIENCY_CHOICES, SCOPE_CHOICES, STEP_CHOICES
from gwq_compile.grid import CLIP_SEARCH_MODES, SUPPORTED_BITS, needs_importance

MAX_OUTLIER_RATIO = 0.5
#: Options kept for the benchmarks' ablations (benchmarks/quality.py), the one list of them:
#: choosing one warns, with the reason.
EXPERIMENTAL = {
    ("saliency", "fisher"): "with one calibration sample it ranks weights exactly as 'grad' (squaring keeps the order of |g|)",
    ("compensation", "gptq"): "measured worse than the default and slow on SmolLM2 (benchmarks/results/quality_smollm2.md); 'gptq_act' is the GPTQ option",
    ("outlier_scope", "row"): "outlier_ratio then means round(outlier_ratio * in_features) outliers in every output row, not a share of the layer or model",
}


class ExperimentalOptionWarning(UserWarning):
    """A :data:`EXPERIMENTAL` option was chosen."""


#: Fields of one run (a display flag, the torchao step), not of the quantization: never
#: written into checkpoints, and ignored where older checkpoints hold them.
RUN_FIELDS = ("step", "progress")


@dataclass
class GWQConfig(AOBaseConfig):
    """GWQ: keep the most gradient-sensitive weights in fp16, quantize the rest group-wise.

    Attributes:
        bits: code width of the non-outlier weights, one of 2, 3, 4, 8.
        group_size: weights per (scale, zero) group along the input dimension; -1 means
            one group per output channel.  ``in_features`` need not be a multiple.
        outlier_ratio: fraction of each layer's weights kept as fp16 outliers, in [0, 0.5].
        saliency: how weights are scored from the calibration backward passes:
            ``"grad"`` sum over samples of |dL/dW| (the paper's, one sample);
            ``"fisher"`` sum of (dL/dW)^2 (empirical Fisher diagonal; experimental, :data:`EXPERIMENTAL`);
            ``"grad_weight"`` sum of |dL/dW * W| (first-order Taylor change of the loss);
            ``"grad_error"`` sum of |dL/dW| times (W - RTN(W))^2, the squared rounding error
            each weight gets on its layer's own grid (``clip_search`` included, before any
            outlier is taken out): sensitivity times the perturbation quantizing would
            cause, so no outlier is spent on a weight that already sits on the grid;
            ``"hessian"`` SpQR/OBS-style w^2 / [H^-1]_jj^2 from the layer-input Hessian
            (no gradient used; the baseline the paper argues gradients beat).
        outlier_scope: ``"layer"`` takes the top ``outlier_ratio`` of each layer;
            ``"row"`` (experimental, :data:`EXPERIMENTAL`) takes ``round(outlier_ratio * in_features)`` per output row (equal
            counts per row, which kernels like); ``"model"`` takes the top
            ``outlier_ratio`` of all quantized weights of the model together, so sensitive
            layers get more outliers than others (the same total).  Scores of different
            layers are compared as they are, which makes sense for scores in loss units
            (``"grad_error"``).  Needs every layer at once: :func:`gwq_compile.quantize_`, the
            backend, or torchao's ``quantize_`` with ``filter_fn=gwq_filter(model, config)``.
        symmetric: symmetric grid (zero point fixed at the middle code) instead of asymmetric.
        clip_search: how each group's range is chosen: ``"none"`` (or ``False``) plain
            min/max; ``"mse"`` (or ``True``) the shrunk range with the smallest squared
            rounding error (as GPTQ and llama.cpp search it); ``"act_mse"`` the same error
            weighted per input column by the mean squared layer input seen during
            calibration (llama.cpp's imatrix idea: the layer's expected output error);
            ``"mse_wls"``/``"act_wls"`` the same searches, then a weighted least-squares
            refit of each group's scale and zero with its codes held (llama.cpp's make_qkx).
            Rounding stays round-to-nearest.  Ignored by GPTQ compensation, which
            chooses its own grid.
        compensation: ``"gptq"`` (experimental, :data:`EXPERIMENTAL`) quantizes the non-outliers with GPTQ error compensation
            (uses the layer-input Hessian from the same calibration passes) instead of
            round-to-nearest.  Goes beyond the paper.  ``"gptq_act"`` is the same with
            act-order (columns visited by decreasing Hessian diagonal, static groups),
            which matters much more than usual on SmolLM2 (see ``benchmarks/results``).
        damp: relative diagonal dampening of the Hessian for ``"hessian"``/``"gptq"``.
        skip_modules: the layers never quantized.  ``None`` (the default): the output
            embedding, the LM head (``model.get_output_embeddings()``, whatever its name; a
            module named ``lm_head`` in a model without that method), as GPTQ, AWQ and
            bitsandbytes leave it.  A sequence: exactly those fnmatch patterns of module names
            (``()`` quantizes every layer, the head on the main grid).
        head_bits: ``None`` leaves the output embedding to ``skip_modules``; 2, 3, 4 or 8
            quantize it on its own grid (``head_bits``, ``head_group_size``) whatever
            ``skip_modules`` says.  An input embedding tied to it
            shares the one quantized weight (lookups dequantize only the rows they read).
            Its outliers come from the same saliency and ranking as every other layer's.
        head_group_size: the head's group size (-1: per output channel).
        double_quant: store each group's scale as an 8-bit code under one power-of-two
            exponent per output row (``scale = code * 2**e``) and each zero point in ``bits``
            bits: ``8 + bits`` bits a group instead of fp16 + uint8's 24, so groups of 32 cost
            what groups of 64 cost without it (bitsandbytes' ``bnb_4bit_use_double_quant``, the
            k-quants' idea).  The range search rounds its candidates onto that grid.  In memory the
            grid is decoded to fp16 scales once, so every kernel runs unchanged.  Not with
            GPTQ ``compensation`` (it picks its own scales).
        bits_budget: ``None`` gives every layer ``bits``.  A number gives layers mixed code
            widths from :func:`mixed_bits_choices` (``bits`` and its neighbours among 2, 3, 4; 8 too for ``bits=4``),
            chosen by the gradient saliency so that the mean code width over the quantized
            weights is at most ``bits_budget`` (scales, zeros and outliers come on top): each
            layer's cost at width b is ``sum |g| * (W - RTN_b(W))^2`` on its own grid, and
            widths go to the layers whose cost drops most per extra bit.  Each layer's
            ``GWQTensor`` carries its own width, so the stored format is unchanged.
        step: ``None`` (one shot: needs ``calibration_data``), ``"prepare"`` (start
            accumulating gradient saliency) or ``"convert"`` (quantize from what was accumulated).
        progress: show tqdm progress bars.
    """

    # Defaults chosen on WikiText-2 *validation* perplexity of SmolLM2-135M (never the
    # test split): at <= 4.6 bits/weight, groups of 64 + 0.5 % outliers + the
    # activation-weighted range search beat groups of 128 + 1 %, and ranking outliers by
    # |grad| x squared rounding error over the whole model beat |grad| per layer
    # (README, "Choosing the defaults").
    bits: int = 4
    group_size: int = 64
    outlier_ratio: float = 0.005
    saliency: str = "grad_error"
    outlier_scope: str = "model"
    symmetric: bool = False
    clip_search: bool | str = "act_mse"
    compensation: str = "none"
    damp: float = 0.01
    skip_modules: Optional[tuple[str, ...]] = None
    # head_bits stays None (the LM head dense, as GPTQ/AWQ/bitsandbytes leave it): an opt-in
    # for deployment.  For an 8-bit head, groups of 128 measured best on validation (14.77 vs
    # 14.78 for 64 and 14.86 with the head dense; 4-bit heads 15.01-15.14):
    # benchmarks/results/head_selection_smollm2.md.
    head_bits: Optional[int] = None
    head_group_size: int = 128
    double_quant: bool = False
    bits_budget: Optional[float] = None
    step: Optional[str] = None
    progress: bool = field(default=True, compare=False)  # a display flag: no part of what two configs quantize alike

    def __post_init__(self) -> None:
        # Integers only (numpy ints too): 4.0 would pass `in SUPPORTED_BITS` and then fail in a bit shift.
        if isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Integral) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GWQConfig.bits must be an int, one of {SUPPORTED_BITS}, got {self.bits!r}")
        self.bits = int(self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, numbers.Integral) or (self.group_size <= 0 and self.group_size != -1):
            raise ValueError(f"GWQConfig.group_size must be a positive int or -1 (per output channel), got {self.group_size!r}")
        self.group_size = int(self.group_size)
        if isinstance(self.outlier_ratio, bool) or not isinstance(self.outlier_ratio, (int, float)) or not 0.0 <= self.outlier_ratio <= MAX_OUTLIER_RATIO:
            raise ValueError(f"GWQConfig.outlier_ratio must be in [0, {MAX_OUTLIER_RATIO}], got {self.outlier_ratio!r}")
        self._check_choice("saliency", SALIENCY_CHOICES)
        self._check_choice("outlier_scope", SCOPE_CHOICES)
        self._check_choice("compensation", COMPENSATION_CHOICES)
        self._check_choice("step", STEP_CHOICES)
        for (name, value), why in EXPERIMENTAL.items():
            if getattr(self, name) == value:
                warnings.warn(f"GWQConfig({name}={value!r}) is experimental: {why}", ExperimentalOptionWarning, stacklevel=3)
        if not isinstance(self.clip_search, (bool, str)) or (isinstance(self.clip_search, str) and self.clip_search not in CLIP_SEARCH_MODES):
            raise ValueError(f"GWQConfig.clip_search must be True, False or one of {CLIP_SEARCH_MODES}, got {self.clip_search!r}")
        if self.head_bits is not None and (isinstance(self.head_bits, bool) or not isinstance(self.head_bits, numbers.Integral) or self.head_bits not in SUPPORTED_BITS):
            raise ValueError(f"GWQConfig.head_bits must be None or one of {SUPPORTED_BITS}, got {self.head_bits!r}")
        if isinstance(self.head_group_size, bool) or not isinstance(self.head_group_size, numbers.Integral) or (self.head_group_size <= 0 and self.head_group_size != -1):
            raise ValueError(f"GWQConfig.head_group_size must be a positive int or -1 (per output channel), got {self.head_group_size!r}")
        if self.bits_budget is not None:
            choices = mixed_bits_choices(self.bits)
            if isinstance(self.bits_budget, bool) or not isinstance(self.bits_budget, (int, float)) or not choices[0] <= self.bits_budget <= choices[-1]:
                raise ValueError(f"GWQConfig.bits_budget must be None or a mean code width in [{choices[0]}, {choices[-1]}] for bits={self.bits}, got {self.bits_budget!r}")
            if self.saliency == "hessian":
                raise ValueError("GWQConfig.bits_budget chooses widths from the gradient saliency; saliency='hessian' has none")
            self.bits_budget = float(self.bits_budget)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"GWQConfig.double_quant must be True or False, got {self.double_quant!r}")
        if self.double_quant and self.compensation != "none":
            raise ValueError(f"GWQConfig.double_quant needs compensation='none': GPTQ compensation ({self.compensation!r}) chooses its own fp16 scales")
        if not isinstance(self.damp, (int, float)) or not 0.0 < self.damp < 1.0:
            raise ValueError(f"GWQConfig.damp must be in (0, 1), got {self.damp!r}")
        if isinstance(self.skip_modules, str):
            raise TypeError("GWQConfig.skip_modules must be None or a sequence of name patterns, not a single string")
        if self.skip_modules is not None:
            self.skip_modules = tuple(self.skip_modules)
            if not all(isinstance(pattern, str) for pattern in self.skip_modules):
                raise TypeError(f"GWQConfig.skip_modules must hold name patterns (str), got {self.skip_modules!r}")

    def _check_choice(self, name: str, choices: tuple) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"GWQConfig.{name} must be one of {choices}, got {value!r}")

    def head_config(self) -> "GWQConfig":
        """This config with the head's grid (``head_bits``, ``head_group_size``): what the LM head is quantized with."""
        if self.head_bits is None:
            raise ValueError("GWQConfig.head_bits is None: the output embedding is not quantized")
        return self.replace(bits=self.head_bits, group_size=self.head_group_size, bits_budget=None)

    @property
    def needs_gradients(self) -> bool:
        return self.saliency != "hessian"

    @property
    def needs_input_sq(self) -> bool:
        """Whether calibration must record each layer's mean squared input per column: for the
        ``"act_mse"`` grid, or for ``"grad_error"``'s rounding errors on that grid."""
        return needs_importance(self.clip_search) and (self.compensation == "none" or self.saliency == "grad_error")

    @property
    def needs_hessian(self) -> bool:
        return self.saliency == "hessian" or self.compensation != "none"

    def to_dict(self) -> dict:
        """The quantization's fields as plain JSON-able values (what checkpoints record): not
        :data:`RUN_FIELDS`, which describe one run, not the model."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUN_FIELDS}
        d["skip_modules"] = None if self.skip_modules is None else list(self.skip_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GWQConfig":
        """The config :meth:`to_dict` recorded; :data:`RUN_FIELDS` that older checkpoints recorded are
        ignored, and their ``skip_output_embeddings`` is folded into ``skip_modules``."""
        d = _legacy_skip_modules(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GWQConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k not in RUN_FIELDS})

    def replace(self, **changes) -> "GWQConfig":
        return dataclasses.replace(self, **changes)


def _legacy_skip_modules(d: dict) -> dict:
    """Checkpoints before 2026-12 recorded ``skip_modules`` (default ``["lm_head"]``) and
    ``skip_output_embeddings`` (default True) side by side.  Both defaults, or no pattern with
    the flag, mean the head: ``None``; other patterns keep the head by its usual name."""
    if "skip_output_embeddings" not in d:
        return d
    d = dict(d)
    flag, patterns = d.pop("skip_output_embeddings"), list(d.get("skip_modules") or [])
    if flag:
        d["skip_modules"] = None if patterns in ([], ["lm_head"]) else sorted(set(patterns) | {"lm_head"})
    return d


def mixed_bits_choices(bits: int) -> tuple[int, ...]:
    """The code widths ``bits_budget`` chooses from: ``bits`` and its neighbours among 2, 3, 4,
    and 8 above 4 (a few very sensitive layers at 8 bits; llama.cpp's k-quant mixes do the same
    with 6 bits); 8 alone for 8.

    Example:
        >>> mixed_bits_choices(4), mixed_bits_choices(3), mixed_bits_choices(8)
        ((3, 4, 8), (2, 3, 4), (8,))
    """
    if bits == 8:
        return (8,)
    return tuple(b for b in (2, 3, 4) if abs(b - bits) <= 1) + ((8,) if bits == 4 else ())


def config_fields() -> list[str]:
    """Names of all GWQConfig fields (used to validate option dicts)."""
    return [f.name for f in dataclasses.fields(GWQConfig)]
