"""CLIP text transformer as SD3 uses it (CLIP-L/14 and OpenCLIP bigG/14 text towers).

Reproduces transformers' ``CLIPTextModelWithProjection`` (5.x) op for op: token + position embedding, pre-LN
blocks with causal self-attention, final LayerNorm, pooled state at the EOS position, bias-free projection.
SD3 reads the *penultimate* block output without the final LayerNorm. Module and parameter names follow the
checkpoint keys (``text_model.encoder.layers.{i}.self_attn.q_proj.weight``, ...), so loading is an identity map.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from impl.math import ACTIVATIONS, attention, matmul_attention


@dataclass(frozen=True, kw_only=True)
class ClipConfig:
    vocab_size: int = 49408
    width: int
    heads: int
    layers: int
    intermediate: int
    activation: str  # "quick_gelu" (CLIP-L) or "gelu" (CLIP-G)
    projection_dim: int
    max_positions: int = 77
    eps: float = 1e-5
    eos_id: int = 49407

    @classmethod
    def from_hf(cls, cfg: dict, source: str) -> "ClipConfig":
        """From a transformers ``CLIPTextConfig`` ``config.json`` (the text_encoder/ folders of SD3 repositories)."""
        from impl.weights import config_value as v

        act = v(cfg, source, "hidden_act", str, "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        from impl.weights import MAX_LAYERS, MAX_VOCAB, divides

        width, heads = v(cfg, source, "hidden_size"), v(cfg, source, "num_attention_heads")
        divides(source, "num_attention_heads", heads, "hidden_size", width)
        return cls(vocab_size=v(cfg, source, "vocab_size", hi=MAX_VOCAB), width=width, heads=heads,
                   layers=v(cfg, source, "num_hidden_layers", hi=MAX_LAYERS),
                   intermediate=v(cfg, source, "intermediate_size"), activation=act,
                   projection_dim=v(cfg, source, "projection_dim"),
                   max_positions=v(cfg, source, "max_position_embeddings", int, 77),
                   eps=v(cfg, source, "layer_norm_eps", float, 1e-5, lo=0.0))


@dataclass
class ClipOutput:
    last: Tensor  # (B, L, W) final-LayerNorm'd last layer
    penultimate: Tensor  # (B, L, W) output of layer n-2, no final LayerNorm (what SD3 uses)
    pooled: Tensor  # (B, W) final-LN state at the pooled index
    projected: Tensor  # (B, P) pooled @ text_projection


class Attention(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.heads = c.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.width, c.width) for _ in range(4))

    def forward(self, x: Tensor, kernel: str = "sdpa") -> Tensor:  # (B, L, W)
        """``kernel``: ``sdpa`` (causal SDPA) or ``matmul`` (``impl.math.matmul_attention`` with a causal mask of
        the dtype's lowest value)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if kernel == "matmul":
            n = x.shape[1]
            causal = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
            return self.out_proj(matmul_attention(q, k, v, self.heads, causal))
        if kernel != "sdpa":
            raise ValueError(f"CLIP attention kernel {kernel!r}: expected 'sdpa' or 'matmul'")
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class MLP(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.activation]
        self.fc1, self.fc2 = nn.Linear(c.width, c.intermediate), nn.Linear(c.intermediate, c.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(c.width, eps=c.eps), nn.LayerNorm(c.width, eps=c.eps)
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.resid_attn = nn.Identity()  # capture point: residual stream after attention

    def forward(self, x: Tensor, kernel: str = "sdpa") -> Tensor:
        x = self.resid_attn(x + self.self_attn(self.layer_norm1(x), kernel))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.max_positions, c.width)

    def forward(self, ids: Tensor) -> Tensor:  # (B, L) -> (B, L, W)
        return self.token_embedding(ids) + self.position_embedding.weight[None, : ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))


class TextModel(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.embeddings, self.encoder = Embeddings(c), Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.width, eps=c.eps)


class ClipTextEncoder(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.text_model = TextModel(config)
        self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, ids: Tensor, pool: str = "argmax", attention: str = "sdpa") -> ClipOutput:
        """``ids`` (B, L) int64. ``pool``: ``argmax`` of the ids (OpenAI, SAI, transformers with a legacy
        ``eos_token_id == 2`` config) or ``first_eos`` (first position equal to ``eos_id``). ``attention``: the
        layers' kernel, ``sdpa`` or ``matmul``."""
        if ids.shape[1] > self.config.max_positions:
            raise ValueError(f"CLIP input has {ids.shape[1]} tokens; at most {self.config.max_positions} fit")
        x = self.text_model.embeddings(ids)
        states = []
        for layer in self.text_model.encoder.layers:
            x = layer(x, attention)
            states.append(x)
        last = self.text_model.final_layer_norm(x)
        index = pooled_index(ids, pool, self.config.eos_id)
        pooled = last[torch.arange(last.shape[0], device=last.device), index]
        return ClipOutput(last, states[-2], pooled, self.text_projection(pooled))


def pooled_index(ids: Tensor, pool: str, eos_id: int) -> Tensor:
    if pool == "argmax":
        return ids.to(torch.int).argmax(dim=-1)
    if pool == "first_eos":
        return (ids.to(torch.int) == eos_id).int().argmax(dim=-1)
    raise ValueError(f"unknown pooling rule {pool!r}; expected 'argmax' or 'first_eos'")
