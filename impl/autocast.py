"""CUDA autocast's float16 policy as a function mode that runs on any device (QUIRKS N2, V2).

The SD3.5 reference runs its samplers and its VAE under ``torch.autocast("cuda", dtype=torch.float16)``: matrix
products and convolutions in float16, norms, softmax, ``exp``/``pow``/``rsqrt`` and upsampling in float32, all else
in whatever dtype its inputs have. Autocast is a dispatcher key that exists only for CUDA tensors here, so
``CudaAutocastFp16`` reapplies the same per-op casts at the Python API: before a listed op its floating inputs
(float64 excepted) are cast, exactly as autocast's ``cached_cast`` does, and the op runs on the current device.
The op lists are torch's own (``ATen/autocast_mode.h``: ``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``,
``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_PROMOTE``), keyed by the Python names that reach those ATen ops;
``tests/test_autocast.py`` checks them against the installed header.

What this gives is the reference's dtype flow. The kernels stay the current device's: on CPU the float16 GEMMs
and convolutions are CPU kernels, not cuBLAS/cuDNN ones, so values agree with a GPU run only up to those
kernels' rounding.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CONV = ("conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
LOWER = frozenset(_CONV + (
    "prelu", "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "vecdot",
    "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "multi_dot", "lstm_cell", "gru_cell", "rnn_tanh_cell",
    "rnn_relu_cell", "scaled_dot_product_attention"))
FP32 = frozenset((
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "rms_norm", "group_norm", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist",
    "renorm", "logsumexp", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "norm"))
FP32_DTYPE = frozenset(("prod", "softmax", "log_softmax", "cumprod", "cumsum", "vector_norm", "matrix_norm", "sum"))
PROMOTE = frozenset(("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sample", "index_put",
                     "tensordot", "scatter_add"))


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast(value, dtype: torch.dtype):
    if _eligible(value) and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _widest(values) -> torch.dtype | None:
    dtype = None
    for v in values:
        for t in v if isinstance(v, (list, tuple)) else (v,):
            if _eligible(t):
                dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


class CudaAutocastFp16(TorchFunctionMode):
    """``with CudaAutocastFp16(): ...`` computes as the body would under ``torch.autocast("cuda", torch.float16)``
    with its tensors on CUDA (the dtype of every op's inputs and output; see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in LOWER:
            args, kwargs = _cast(args, torch.float16), {k: _cast(v, torch.float16) for k, v in kwargs.items()}
        elif name in FP32:
            args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        elif name in FP32_DTYPE and kwargs.get("dtype") is None and args and _eligible(args[0]):
            kwargs = {**kwargs, "dtype": torch.float32}  # autocast's fp32_set_opt_dtype: the op accumulates in fp32
        elif name in PROMOTE:
            widest = _widest(list(args) + list(kwargs.values()))
            if widest is not None:
                args, kwargs = _cast(args, widest), {k: _cast(v, widest) for k, v in kwargs.items()}
        return func(*args, **kwargs)
