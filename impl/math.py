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


# ------------------------------------------------------------------ matmul kernels (ComfyUI without PyTorch attention)
# Attention written as matrix products instead of one fused SDPA call: ComfyUI's choice on a CPU (and wherever its
# PyTorch attention is off). The op sequence, the operand layouts and the memory-driven chunking decide the bits.

def available_memory(device: torch.device) -> int:
    """Bytes free for the chunking rules below, measured as ComfyUI measures them: on the CPU the kernel's
    ``MemAvailable`` (what psutil reports on Linux; elsewhere unlimited), on CUDA the driver's free memory plus
    what torch has reserved and is not using."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return torch.cuda.mem_get_info(device)[0] + stats["reserved_bytes.all.current"] - stats["active_bytes.all.current"]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 ** 62


def to_heads(t: Tensor, heads: int, contiguous: bool = True) -> Tensor:
    """(B, L, H*D) -> (B*H, L, D); without ``contiguous``, a view where one exists (a batch of 1: the heads stay
    interleaved in memory; the product kernels round by layout, so the layout is part of what is reproduced)."""
    b, n, _ = t.shape
    out = t.reshape(b, n, heads, -1).permute(0, 2, 1, 3).reshape(b * heads, n, -1)
    return out.contiguous() if contiguous else out


def from_heads(t: Tensor, heads: int) -> Tensor:
    """(B*H, L, D) -> (B, L, H*D)."""
    return t.unflatten(0, (-1, heads)).transpose(1, 2).flatten(start_dim=2)


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """(B, L, H*D) x3 -> (B, L, H*D): scores q k^T by einsum, then times D**-0.5, ``mask`` (additive, (L, L) or
    (B or 1, H or 1, L, L)) added in place, softmax, times v (ComfyUI's ``attention_basic``: its CLIP and T5 kernel)."""
    b = q.shape[0]
    q, k, v = (to_heads(t, heads) for t in (q, k, v))
    scores = torch.einsum("b i d, b j d -> b i j", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        n = mask.shape[-1]
        scores.add_(mask.reshape(1 if mask.dim() == 2 else mask.shape[0], -1, mask.shape[-2], n)
                    .expand(b, heads, -1, -1).reshape(-1, mask.shape[-2], n))
    out = torch.einsum("b i j, b j d -> b i d", scores.softmax(dim=-1).to(v.dtype), v)
    return from_heads(out, heads)


def sub_quadratic_chunks(free: int, batch_heads: int, element: int, k_tokens: int) -> tuple[int, int | None]:
    """(query chunk, key/value chunk or None) as ComfyUI's ``attention_sub_quad`` picks them: the largest query chunk
    of 4096 ... 256 whose scores over all keys, four times over, fit in ``free`` bytes, with the keys unchunked;
    else 512 and key chunks of sqrt(keys)."""
    for size in (4096, 2048, 1024, 512, 256):
        if free / (batch_heads * element * size * 4.0) >= k_tokens:
            return size, k_tokens
    return 512, None


def sub_quadratic_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, free: int | None = None) -> Tensor:
    """(B, L, H*D) x3 -> (B, L, H*D): scores by ``baddbmm`` (alpha D**-0.5) per query chunk; with the keys
    unchunked, softmax then times v; with key chunks, each chunk's exponentials against its own maximum, rescaled
    to the global one and summed (ComfyUI's ``attention_sub_quad``, the memory-efficient attention of Rabe and
    Staats). The per-head operands are views of the inputs where one exists, as there. ``free``: the bytes the
    chunk sizes are chosen for (default: measured now)."""
    b, n, _ = q.shape
    q, v = to_heads(q, heads, contiguous=False), to_heads(v, heads, contiguous=False)
    k_t = k.reshape(b, k.shape[1], heads, -1).permute(0, 2, 3, 1).reshape(b * heads, q.shape[-1], -1)
    d, keys = q.shape[-1], k_t.shape[-1]
    q_chunk, kv_chunk = sub_quadratic_chunks(available_memory(q.device) if free is None else free, b * heads,
                                             q.element_size(), keys)
    kv_chunk = min(kv_chunk or int(math.sqrt(keys)), keys)
    scale = d ** -0.5

    def scores(qc: Tensor, kc: Tensor) -> Tensor:
        return torch.baddbmm(torch.empty(1, 1, 1, dtype=qc.dtype, device=qc.device), qc, kc, alpha=scale, beta=0)

    def whole(qc: Tensor) -> Tensor:
        return torch.bmm(scores(qc, k_t).softmax(dim=-1).to(v.dtype), v)

    def chunked(qc: Tensor) -> Tensor:
        values, sums, maxima = [], [], []
        for start in range(0, keys, kv_chunk):
            s = scores(qc, k_t[:, :, start:start + kv_chunk])
            top = torch.max(s, -1, keepdim=True)[0]
            s -= top
            torch.exp(s, out=s)
            e = s.to(v.dtype)
            values.append(torch.bmm(e, v[:, start:start + kv_chunk]))
            sums.append(e.sum(dim=-1))
            maxima.append(top.squeeze(-1))
        values, sums, maxima = torch.stack(values), torch.stack(sums), torch.stack(maxima)
        rescale = torch.exp(maxima - torch.max(maxima, 0, keepdim=True)[0])
        values *= rescale.unsqueeze(-1)
        sums *= rescale
        return values.sum(dim=0) / sums.unsqueeze(-1).sum(dim=0)

    one = whole if keys <= kv_chunk else chunked
    out = one(q) if n <= q_chunk else torch.cat([one(q[:, i:i + q_chunk]) for i in range(0, n, q_chunk)], dim=1)
    return from_heads(out, heads)


def sliced_attention(q: Tensor, k: Tensor, v: Tensor, free: int | None = None) -> Tensor:
    """Single-head attention over (B, C, H, W) maps -> (B, C, H, W): scores (q^T k) * C**-0.5 and softmax, then
    v times their transpose, in query slices when the scores would not fit in ``free`` bytes (ComfyUI's VAE
    ``normal_attention`` / ``slice_attention``; default: measured now)."""
    shape = q.shape
    b, c = shape[:2]
    q, k, v = q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1), v.reshape(b, c, -1)
    free = available_memory(q.device) if free is None else free
    need = q.shape[0] * q.shape[1] * k.shape[2] * q.element_size() * (3 if q.element_size() == 2 else 2.5)
    steps = 2 ** math.ceil(math.log(need / free, 2)) if need > free else 1
    size = q.shape[1] // steps if q.shape[1] % steps == 0 else q.shape[1]
    out = torch.zeros_like(k)
    for i in range(0, q.shape[1], size):
        weights = torch.softmax(torch.bmm(q[:, i:i + size], k) * int(c) ** -0.5, dim=2).permute(0, 2, 1)
        out[:, :, i:i + size] = torch.bmm(v, weights)
    return out.reshape(shape)


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
