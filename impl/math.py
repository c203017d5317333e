"""Small shared maths: attention and activations. Shapes: B batch, H heads, L tokens, D head dim."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, *, mask: Tensor | None = None, causal: bool = False,
              scale: float | None = None) -> Tensor:
    """(B, L, H*D) x3 -> (B, L, H*D). ``mask`` is additive (broadcast to (B, H, L, L)); ``scale`` defaults to D**-0.5."""
    b, n, _ = q.shape
    q, k, v = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)  # (B, H, L, D)
    return out.transpose(1, 2).reshape(b, n, -1)  # (B, L, H*D)


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's approximation, x * sigmoid(1.702 x) (CLIP-L)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh_formula(x: Tensor) -> Tensor:
    """The tanh GELU written out term by term (transformers ``gelu_new``); differs from ``F.gelu(tanh)`` by ulps."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,  # exact erf GELU (CLIP-G)
    "gelu_new": gelu_tanh_formula,  # transformers T5 v1.1
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # the SD3.5 reference's T5
}


class RMSNorm(nn.Module):
    """RMS norm. ``form="upcast"``: as transformers' T5LayerNorm and diffusers' RMSNorm compute it (variance in
    float32, the input scaled by its rsqrt, cast to the weight's dtype when that is half precision, then times
    the weight). ``form="native"``: as the SD3.5 reference's qk-norm (everything in the input dtype, the weight
    cast to it; QUIRKS M6). ``form="fused"``: torch's ``F.rms_norm`` with the weight cast to the input dtype, as
    ComfyUI's qk-norm (one kernel on CUDA: float32 inside, one rounding). Used by the T5 encoder and as the MMDiT
    qk-norm."""

    def __init__(self, dim: int, eps: float, form: str = "upcast"):
        super().__init__()
        if form not in ("upcast", "native", "fused"):
            raise ValueError(f"RMSNorm form {form!r}: expected 'upcast', 'native' or 'fused'")
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.form = eps, form

    def forward(self, x: Tensor) -> Tensor:
        if self.form == "fused":
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
        if self.form == "native":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return x * self.weight.to(x.dtype)  # the normed dtype: float32 under autocast (pow/rsqrt)
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight
