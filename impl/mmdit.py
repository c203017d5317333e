"""MMDiT (SD3-Medium), MMDiT with RMSNorm qk-norm (SD3.5-Large / Large-Turbo) and MMDiT-X (SD3.5-Medium).

Module and parameter names are the SAI single-file checkpoint keys without the ``model.diffusion_model.`` prefix
(``joint_blocks.{i}.x_block.attn.qkv.weight``, ...), so an SAI checkpoint loads by identity. The two references
compute the same function with different op orders; ``MMDiTOptions`` picks one (plain values, no profile names):

* ``attention_order`` (QUIRKS M3): ``image_first`` concatenates [image, context] tokens for the joint attention
  (diffusers), ``context_first`` [context, image] (the SD3.5 reference). Softmax sums run in another order.
* ``qkv`` (M4): ``split`` runs three GEMMs on the thirds of the fused weight (diffusers' to_q/to_k/to_v),
  ``fused`` one GEMM then a reshape (the SD3.5 reference).
* ``qk_norm`` (M6): ``upcast`` (diffusers: float32 variance, cast to the weight dtype, times the weight, on the
  per-head (B, H, L, E) view) or ``native`` (the SD3.5 reference: all in the input dtype, on the per-token
  (B, L, H, E) view). Equal in float32. The view matters in half precision: CPU half ``rsqrt`` rounds some
  elements differently by where they fall in the kernel's vector loop (measured: 11 of 924 values), so the
  reference's layout is part of its form. ``fused`` (ComfyUI): torch's ``F.rms_norm`` on the per-token view; on
  the CPU in float32 it equals ``native``, on CUDA it is one kernel that rounds once, in float32 too.

Shapes: B batch, N image tokens, M context tokens, D hidden, H heads, E head dim (64 in every released model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impl.math import RMSNorm, sub_quadratic_attention


@dataclass(frozen=True, kw_only=True)
class MMDiTConfig:
    depth: int
    hidden: int
    heads: int
    pos_embed_max_size: int
    context_dim: int  # joint_attention_dim: width of the text context (4096 = T5-XXL)
    pooled_dim: int  # adm_in_channels / pooled_projection_dim (2048 = CLIP-L + CLIP-G)
    qk_norm: bool = False  # RMSNorm on q and k per head (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X blocks with a second, image-only attention
    patch: int = 2
    in_channels: int = 16
    out_channels: int = 16
    mlp_ratio: int = 4
    freq_dim: int = 256
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str) -> "MMDiTConfig":
        """From a diffusers ``SD3Transformer2DModel`` ``config.json`` (``transformer/`` of SD3 repositories)."""
        from impl.weights import config_value as v

        heads, head_dim = v(cfg, source, "num_attention_heads"), v(cfg, source, "attention_head_dim")
        qk = cfg.get("qk_norm")
        if qk not in (None, "rms_norm"):
            raise ValueError(f"{source}: qk_norm {qk!r} is not supported (expected null or 'rms_norm')")
        if v(cfg, source, "caption_projection_dim", int, heads * head_dim) != heads * head_dim:
            raise ValueError(f"{source}: caption_projection_dim must equal num_attention_heads * attention_head_dim")
        from impl.weights import MAX_LAYERS

        depth = v(cfg, source, "num_layers", hi=MAX_LAYERS)
        dual = v(cfg, source, "dual_attention_layers", list, [])
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth for i in dual):
            raise ValueError(f"{source}: config key 'dual_attention_layers' is {dual!r}; expected block indices "
                             f"0..{depth - 1}")
        return cls(depth=depth, hidden=heads * head_dim, heads=heads,
                   pos_embed_max_size=v(cfg, source, "pos_embed_max_size"),
                   context_dim=v(cfg, source, "joint_attention_dim"),
                   pooled_dim=v(cfg, source, "pooled_projection_dim"), qk_norm=qk == "rms_norm",
                   dual_attention_layers=tuple(dual), patch=v(cfg, source, "patch_size", int, 2),
                   in_channels=v(cfg, source, "in_channels", int, 16),
                   out_channels=v(cfg, source, "out_channels", int, 16))

    def __post_init__(self):
        if self.hidden > 1 << 16:
            raise ValueError(f"MMDiT width {self.hidden} (num_attention_heads x attention_head_dim): at most {1 << 16}")


@dataclass(frozen=True, kw_only=True)
class MMDiTOptions:
    attention_order: str = "image_first"  # "image_first" (diffusers) or "context_first" (SD3.5 reference)
    qkv: str = "split"  # "split" (diffusers) or "fused" (SD3.5 reference)
    qk_norm: str = "upcast"  # "upcast" (diffusers), "native" (SD3.5 reference) or "fused" (ComfyUI: F.rms_norm)
    casts: str = "cast_back"  # N3: diffusers' explicit casts back to the input dtype, or "promote" (the SD3.5 code)
    modulate: str = "mul_add"  # x * (1 + scale) + shift, or "addcmul": torch.addcmul(shift, x, 1 + scale) (ComfyUI)
    attention: str = "sdpa"  # or "sub_quadratic": impl.math.sub_quadratic_attention (ComfyUI's CPU kernel)

    def __post_init__(self):
        if self.attention_order not in ("image_first", "context_first"):
            raise ValueError(f"attention_order {self.attention_order!r}: expected 'image_first' or 'context_first'")
        if self.qkv not in ("split", "fused"):
            raise ValueError(f"qkv {self.qkv!r}: expected 'split' or 'fused'")
        if self.qk_norm not in ("upcast", "native", "fused"):
            raise ValueError(f"qk_norm {self.qk_norm!r}: expected 'upcast', 'native' or 'fused'")
        if self.casts not in ("cast_back", "promote"):
            raise ValueError(f"casts {self.casts!r}: expected 'cast_back' or 'promote'")
        if self.modulate not in ("mul_add", "addcmul"):
            raise ValueError(f"modulate {self.modulate!r}: expected 'mul_add' or 'addcmul'")
        if self.attention not in ("sdpa", "sub_quadratic"):
            raise ValueError(f"attention {self.attention!r}: expected 'sdpa' or 'sub_quadratic'")


class QKNorm(RMSNorm):
    """The qk RMSNorm on per-head (B, H, L, E) tensors. The ``native`` and ``fused`` forms compute on the per-token
    view (B, L, H, E) of the same memory, as the SD3.5 code and ComfyUI do; inputs and outputs stay per head."""

    def forward(self, x: Tensor) -> Tensor:
        if self.form in ("native", "fused"):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
        return super().forward(x)


class SelfAttention(nn.Module):
    """Fused ``qkv`` projection, optional qk RMSNorm, output ``proj`` (absent in the pre-only context block).
    Identity modules ``q``, ``k``, ``v`` (projections before the norm, (B, L, D)) are capture points."""

    def __init__(self, c: MMDiTConfig, pre_only: bool = False, norm_form: str = "upcast"):
        super().__init__()
        self.heads, self.head_dim = c.heads, c.head_dim
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        if not pre_only:
            self.proj = nn.Linear(c.hidden, c.hidden)
        if c.qk_norm:
            self.ln_q, self.ln_k = QKNorm(c.head_dim, c.eps, norm_form), QKNorm(c.head_dim, c.eps, norm_form)
        self.q, self.k, self.v = nn.Identity(), nn.Identity(), nn.Identity()

    def project(self, x: Tensor, qkv: str) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v as (B, H, L, E) views, q and k normed."""
        if qkv == "split":
            w, b = self.qkv.weight.chunk(3, dim=0), self.qkv.bias.chunk(3, dim=0)
            q, k, v = (F.linear(x, w[i], b[i]) for i in range(3))
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = self.q(q), self.k(k), self.v(v)
        q, k, v = (t.view(t.shape[0], -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def attend(q: Tensor, k: Tensor, v: Tensor, cast: bool = True, kernel: str = "sdpa") -> Tensor:
    """(B, H, L, E) x3 -> (B, L, H*E); ``cast``: back to q's dtype (diffusers' processor). ``kernel``: ``sdpa`` or
    ``sub_quadratic``."""
    if kernel == "sub_quadratic":  # on (B, L, H*E) copies, laid out as ComfyUI's joint q, k, v are
        heads = q.shape[1]
        return sub_quadratic_attention(*(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in (q, k, v)),
                                       heads)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3])
    return out.to(q.dtype) if cast else out


def ada_linear(ada: nn.Sequential, c: Tensor, x: Tensor, cast: bool) -> Tensor:
    """SiLU, then Linear; ``cast``: SiLU's output to x's dtype first (diffusers' AdaLayerNormContinuous)."""
    h = ada[0](c)
    return ada[1](h.to(x.dtype) if cast else h)


class Mlp(nn.Module):
    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.hidden, c.mlp_ratio * c.hidden), nn.Linear(c.mlp_ratio * c.hidden, c.hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: Tensor, shift: Tensor, scale: Tensor, fused: bool = False) -> Tensor:
    """adaLN: x * (1 + scale) + shift, two roundings; ``fused``: ``torch.addcmul``, whose CPU kernel rounds
    differently."""
    if fused:
        return torch.addcmul(shift[:, None], x, 1 + scale[:, None])
    return x * (1 + scale[:, None]) + shift[:, None]


class DismantledBlock(nn.Module):
    """One stream (image ``x_block`` or ``context_block``) of a joint block: adaLN modulation (6 chunks: shift,
    scale, gate for attention and MLP; 9 with the MMDiT-X second attention; 2 (shift, scale) when pre-only)."""

    def __init__(self, c: MMDiTConfig, pre_only: bool = False, dual: bool = False, norm_form: str = "upcast",
                 fused: bool = False):
        super().__init__()
        self.pre_only, self.dual, self.eps, self.fused = pre_only, dual, c.eps, fused
        n_mods = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden, n_mods * c.hidden))
        self.attn = SelfAttention(c, pre_only, norm_form)
        if dual:
            self.attn2 = SelfAttention(c, norm_form=norm_form)
        if not pre_only:
            self.mlp = Mlp(c)

    def norm(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def pre(self, x: Tensor, c: Tensor, cast: bool = True) -> tuple[Tensor, Tensor | None, tuple]:
        """Modulated input of the joint attention, of the second attention (MMDiT-X), and the later modulations."""
        if self.pre_only:  # diffusers' AdaLayerNormContinuous: SiLU, cast to x's dtype, Linear; (shift, scale) here
            shift, scale = ada_linear(self.adaLN_modulation, c, x, cast).chunk(2, dim=1)
            return modulate(self.norm(x), shift, scale, self.fused), None, ()
        mods = self.adaLN_modulation(c).chunk(9 if self.dual else 6, dim=1)
        normed = self.norm(x)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        second = modulate(normed, mods[6], mods[7], self.fused) if self.dual else None
        return (modulate(normed, shift_msa, scale_msa, self.fused), second,
                (gate_msa, shift_mlp, scale_mlp, gate_mlp, *mods[8:]))

    def post(self, x: Tensor, attn: Tensor, mods: tuple, second: Tensor | None = None, qkv: str = "split",
             cast: bool = True, kernel: str = "sdpa") -> Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:4]
        x = x + gate_msa[:, None] * self.attn.proj(attn)
        if self.dual:
            x = x + mods[4][:, None] * self.attn2.proj(attend(*self.attn2.project(second, qkv), cast, kernel))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm(x), shift_mlp, scale_mlp, self.fused))


class JointBlock(nn.Module):
    def __init__(self, c: MMDiTConfig, pre_only: bool, dual: bool, norm_form: str = "upcast", fused: bool = False):
        super().__init__()
        self.context_block = DismantledBlock(c, pre_only=pre_only, norm_form=norm_form, fused=fused)
        self.x_block = DismantledBlock(c, dual=dual, norm_form=norm_form, fused=fused)

    def forward(self, context: Tensor, x: Tensor, c: Tensor, opt: MMDiTOptions) -> tuple[Tensor | None, Tensor]:
        cast = opt.casts == "cast_back"
        x_in, x_second, x_mods = self.x_block.pre(x, c)
        ctx_in, _, ctx_mods = self.context_block.pre(context, c, cast)
        xq, xk, xv = self.x_block.attn.project(x_in, opt.qkv)
        cq, ck, cv = self.context_block.attn.project(ctx_in, opt.qkv)
        n = x.shape[1]
        if opt.attention_order == "image_first":
            attn = attend(torch.cat([xq, cq], 2), torch.cat([xk, ck], 2), torch.cat([xv, cv], 2), cast, opt.attention)
            x_attn, ctx_attn = attn[:, :n], attn[:, n:]
        else:
            attn = attend(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2), cast, opt.attention)
            ctx_attn, x_attn = attn[:, : attn.shape[1] - n], attn[:, attn.shape[1] - n:]
        x = self.x_block.post(x, x_attn, x_mods, x_second, opt.qkv, cast, opt.attention)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post(context, ctx_attn, ctx_mods), x


class PatchEmbed(nn.Module):
    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(c.in_channels, c.hidden, kernel_size=c.patch, stride=c.patch)


class Embedder(nn.Module):
    """Linear, SiLU, Linear (``mlp.0`` / ``mlp.2``): the timestep and pooled-text embedders."""

    def __init__(self, dim_in: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class FinalLayer(nn.Module):
    def __init__(self, c: MMDiTConfig, fused: bool = False):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden, 2 * c.hidden))
        self.linear = nn.Linear(c.hidden, c.patch * c.patch * c.out_channels)
        self.eps, self.fused = c.eps, fused

    def forward(self, x: Tensor, c: Tensor, cast: bool = True) -> Tensor:
        shift, scale = ada_linear(self.adaLN_modulation, c, x, cast).chunk(2, dim=1)  # QUIRKS M2
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=self.eps), shift, scale, self.fused))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) float timesteps (0..1000) -> (B, dim) float32 [cos | sin] features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig, options: MMDiTOptions = MMDiTOptions()):
        super().__init__()
        c = self.config = config
        self.options = options
        self.x_embedder = PatchEmbed(c)
        self.register_buffer("pos_embed", torch.zeros(1, c.pos_embed_max_size ** 2, c.hidden))
        self.t_embedder = Embedder(c.freq_dim, c.hidden)
        self.y_embedder = Embedder(c.pooled_dim, c.hidden)
        self.context_embedder = nn.Linear(c.context_dim, c.hidden)
        fused = options.modulate == "addcmul"
        self.joint_blocks = nn.ModuleList(
            JointBlock(c, pre_only=i == c.depth - 1, dual=i in c.dual_attention_layers, norm_form=options.qk_norm,
                       fused=fused) for i in range(c.depth))
        self.final_layer = FinalLayer(c, fused)
        self.tokens, self.cond = nn.Identity(), nn.Identity()  # capture points: embedded image tokens, c = t + y

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre crop of the learned (M x M) table for an h x w patch grid (QUIRKS M1)."""
        m = self.config.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.reshape(1, m, m, -1)[:, top: top + h, left: left + w, :]
        return grid.reshape(1, h * w, -1)

    def check_size(self, height: int, width: int) -> None:
        """Latent height/width: multiples of the patch size, within the position table."""
        p, m = self.config.patch, self.config.pos_embed_max_size
        for name, v in (("height", height), ("width", width)):
            if v % p:
                raise ValueError(f"latent {name} {v} is not a multiple of the patch size {p} "
                                 f"(image {name} {v * 8} must be a multiple of {8 * p})")
            if v // p > m:
                raise ValueError(f"latent {name} {v} gives {v // p} patches; the position table holds {m} "
                                 f"(image {name} at most {8 * p * m})")

    def forward(self, x: Tensor, t: Tensor, y: Tensor, context: Tensor, skip_layers: tuple[int, ...] = ()) -> Tensor:
        """x (B, C, H, W) latents, t (B,) timesteps in [0, 1000], y (B, pooled_dim), context (B, M, context_dim)."""
        tokens, c, ctx = self.embed(x, t, y, context)
        for i, block in enumerate(self.joint_blocks):
            if i not in skip_layers:
                ctx, tokens = block(ctx, tokens, c, self.options)
        return self.head(tokens, c, x.shape[2], x.shape[3])

    def embed(self, x: Tensor, t: Tensor, y: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The joint blocks' inputs: image tokens (patches + the cropped position table), the conditioning vector
        c = t_embedder + y_embedder, and the embedded context."""
        _, _, height, width = x.shape
        self.check_size(height, width)
        p = self.config.patch
        cast = self.options.casts == "cast_back"  # diffusers casts back where the SD3.5 code lets dtypes promote
        patches = self.x_embedder.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = patches + self.cropped_pos_embed(height // p, width // p)
        tokens = self.tokens((tokens.to(patches.dtype) if cast else tokens).contiguous())
        t_emb = timestep_embedding(t, self.config.freq_dim).to(y.dtype if cast else tokens.dtype)
        c = self.cond(self.t_embedder(t_emb) + self.y_embedder(y))
        return tokens, c, self.context_embedder(context)

    def head(self, tokens: Tensor, c: Tensor, height: int, width: int) -> Tensor:
        """The final layer on the last block's image tokens, as (B, C, height, width) latents."""
        return self.unpatchify(self.final_layer(tokens, c, self.options.casts == "cast_back"), height, width)

    def unpatchify(self, out: Tensor, height: int, width: int) -> Tensor:
        """(B, N, p*p*C) patch tokens -> (B, C, H, W) latents."""
        p, b = self.config.patch, out.shape[0]
        out = out.reshape(b, height // p, width // p, p, p, self.config.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.config.out_channels, height, width)
