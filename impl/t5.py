"""T5 v1.1 encoder (the T5-XXL text encoder of SD3).

Reproduces transformers' ``T5EncoderModel`` (5.x): RMS LayerNorm without bias or mean, self-attention without
1/sqrt(d) scaling, bidirectional relative position bias computed in block 0 and reused by every block, gated
GELU feed-forward. Options cover the references' numerical differences: the activation (``gelu_new``, a hand-
written tanh formula, vs torch's tanh GELU), ``wo`` kept in float32 when the model runs in float16, and an optional
attention mask (diffusers and the SD3.5 reference pass none). Module names follow the checkpoint keys
(``encoder.block.{i}.layer.0.SelfAttention.q.weight``, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from impl.math import ACTIVATIONS, RMSNorm, attention, matmul_attention


@dataclass(frozen=True, kw_only=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    heads: int
    d_ff: int
    layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    activation: str = "gelu_new"

    @classmethod
    def from_hf(cls, cfg: dict, source: str) -> "T5Config":
        """From a transformers ``T5Config`` ``config.json`` (text_encoder_3/ of SD3 repositories); v1.1 gated only."""
        from impl.weights import config_value as v

        proj = v(cfg, source, "feed_forward_proj", str, "relu")
        if not proj.startswith("gated-"):
            raise ValueError(f"{source}: feed_forward_proj {proj!r}; only the gated T5 v1.1 feed-forward is supported")
        act = "gelu_new" if proj == "gated-gelu" else proj.removeprefix("gated-")  # transformers ignores dense_act_fn
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: dense_act_fn {act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        from impl.weights import MAX_LAYERS, MAX_VOCAB

        return cls(vocab_size=v(cfg, source, "vocab_size", hi=MAX_VOCAB), d_model=v(cfg, source, "d_model"),
                   d_kv=v(cfg, source, "d_kv"), heads=v(cfg, source, "num_heads"), d_ff=v(cfg, source, "d_ff"),
                   layers=v(cfg, source, "num_layers", hi=MAX_LAYERS),
                   num_buckets=v(cfg, source, "relative_attention_num_buckets", int, 32, lo=4),
                   max_distance=v(cfg, source, "relative_attention_max_distance", int, 128, lo=2),
                   eps=v(cfg, source, "layer_norm_epsilon", float, 1e-6, lo=0.0), activation=act)


def relative_bucket(rel: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 bucketing of ``memory - query`` positions: exact below 8, logarithmic up to max_distance."""
    num_buckets //= 2
    buckets = (rel > 0).to(torch.long) * num_buckets
    rel = torch.abs(rel)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(rel < max_exact, rel, large)


class SelfAttention(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool):
        super().__init__()
        inner = c.heads * c.d_kv
        self.heads, self.c = c.heads, c
        self.q, self.k, self.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(c.num_buckets, c.heads)

    def position_bias(self, n: int, table: Tensor | None = None) -> Tensor:  # -> (1, H, L, L)
        """The additive position bias of ``n`` tokens; ``table`` (L, L, H): the looked-up bucket embeddings to use
        instead of this layer's lookup (teacher forcing gives the reference's)."""
        if table is None:
            pos = torch.arange(n, dtype=torch.long, device=self.relative_attention_bias.weight.device)
            bucket = relative_bucket(pos[None, :] - pos[:, None], self.c.num_buckets, self.c.max_distance)
            table = self.relative_attention_bias(bucket)
        return table.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, bias: Tensor, impl: str = "sdpa") -> Tensor:  # bias: additive (1 or B, H, L, L)
        """``impl``: ``sdpa`` (transformers 5: SDPA with the bias as attn_mask, scale 1), ``eager`` (transformers
        4.x: q k^T + bias, softmax in float32 cast back, times v) or ``matmul`` (``impl.math.matmul_attention`` on
        k times sqrt(d_kv), which its D**-0.5 undoes, as ComfyUI's T5 calls its kernels); they differ by ulps."""
        if impl == "sdpa":
            return self.o(attention(self.q(x), self.k(x), self.v(x), self.heads, mask=bias, scale=1.0))
        if impl == "matmul":
            k = self.k(x)
            return self.o(matmul_attention(self.q(x), k * ((k.shape[-1] / self.heads) ** 0.5), self.v(x), self.heads,
                                           bias))
        if impl != "eager":
            raise ValueError(f"T5 attention {impl!r}: expected 'sdpa', 'eager' or 'matmul'")
        b, n, _ = x.shape
        q, k, v = (t.view(b, -1, self.heads, self.c.d_kv).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += bias
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o(torch.matmul(weights, v).transpose(1, 2).contiguous().view(b, -1, self.heads * self.c.d_kv))


class AttentionSublayer(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention, self.layer_norm = SelfAttention(c, has_bias), RMSNorm(c.d_model, c.eps)

    def forward(self, x: Tensor, bias: Tensor, impl: str = "sdpa") -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias, impl)


class GatedFF(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[c.activation]
        self.wi_0, self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False), nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        """``activation``: a name in ``impl.math.ACTIVATIONS`` instead of the config's (transformers maps
        ``gated-gelu`` to ``gelu_new``; the SD3.5 reference always runs torch's tanh GELU, ``gelu_tanh``)."""
        act = self.act if activation is None else ACTIVATIONS[activation]
        h = act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))  # wo may be kept in float32 (transformers, float16 only)


class FFSublayer(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense, self.layer_norm = GatedFF(c), RMSNorm(c.d_model, c.eps)

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x), activation)


class Block(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionSublayer(c, has_bias), FFSublayer(c)])

    def forward(self, x: Tensor, bias: Tensor, impl: str = "sdpa", activation: str | None = None) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, bias, impl))
        return _clamp_fp16(self.layer[1](x, activation))


def _clamp_fp16(x: Tensor) -> Tensor:
    """transformers clamps float16 activations to +-(max - 1000) when any is infinite, else to +-max."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class Stack(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.block = nn.ModuleList(Block(c, has_bias=i == 0) for i in range(c.layers))
        self.final_layer_norm = RMSNorm(c.d_model, c.eps)


class T5Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config)

    def half_keep_wo_fp32(self) -> "T5Encoder":
        """Cast to float16 the way transformers loads T5 in float16: every ``wo`` keeps its float32 values
        (``_keep_in_fp32_modules``). Call it on float32 weights: ``wo`` is never rounded through float16."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if not name.endswith("DenseReluDense.wo.weight"):
                    p.data = p.data.to(torch.float16)
        return self

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, attention: str = "sdpa",
                activation: str | None = None) -> Tensor:
        """``ids`` (B, L) -> last hidden state (B, L, d_model). ``attention_mask`` (B, L) bool: True = attend.
        ``attention``: ``sdpa`` (transformers 5), ``eager`` (transformers 4.x) or ``matmul`` (ComfyUI's CPU kernel). ``activation``: the gated
        feed-forward's activation instead of the config's (``gelu_new`` or ``gelu_tanh``)."""
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"T5 activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
        x = self.shared(ids)
        bias = self.attention_bias(ids.shape[1], attention_mask)
        for block in self.encoder.block:
            x = block(x, bias, attention, activation)
        return self.encoder.final_layer_norm(x)

    def attention_bias(self, n: int, attention_mask: Tensor | None = None, table: Tensor | None = None) -> Tensor:
        """The additive bias every block adds to its attention scores: the first layer's position bias
        (``SelfAttention.position_bias``), masked where ``attention_mask`` (B, L) is False."""
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(n, table)  # (1, H, L, L)
        if attention_mask is not None:
            bias = torch.where(attention_mask[:, None, None, :].bool(), bias, torch.finfo(bias.dtype).min)
        return bias
