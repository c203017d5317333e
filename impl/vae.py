"""The SD3 VAE (16-channel latents): encoder, decoder and the latent format (QUIRKS V1, V1b).

Names follow the SAI checkpoint keys under ``first_stage_model.`` (``decoder.up.{i}.block.{j}.conv1``, ...).
``VAEConfig.attention`` picks how the mid-block attention projects: ``linear`` applies q/k/v/proj_out as Linear
layers on (B, HW, C) tokens like diffusers' ``Attention``; ``conv`` as 1x1 convolutions like the SD3.5
reference; ``conv_sliced`` as 1x1 convolutions with the attention as matrix products in query slices
(``impl.math.sliced_attention``, ComfyUI's CPU kernel). Same weights, different kernels (ulp-level differences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impl.math import sliced_attention


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    groups: int = 32
    eps: float = 1e-6
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str) -> "VAEConfig":
        """From a diffusers ``AutoencoderKL`` ``config.json`` as SD3 uses it (no quant convs)."""
        from impl.weights import config_value as v

        chans = v(cfg, source, "block_out_channels", list)
        if not chans or any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 or c % chans[0] for c in chans):
            raise ValueError(f"{source}: block_out_channels {chans!r} must be positive multiples of the first entry")
        if cfg.get("use_quant_conv") or cfg.get("use_post_quant_conv"):
            raise ValueError(f"{source}: quant convs are not part of the SD3 VAE")
        from impl.weights import MAX_DIM, divides

        if len(chans) > 8 or chans[-1] > MAX_DIM:
            raise ValueError(f"{source}: block_out_channels {chans!r}: at most 8 entries of at most {MAX_DIM}")
        groups = v(cfg, source, "norm_num_groups", int, 32)
        divides(source, "norm_num_groups", groups, "block_out_channels[0]", chans[0])
        return cls(ch=chans[0], ch_mult=tuple(c // chans[0] for c in chans),
                   num_res_blocks=v(cfg, source, "layers_per_block", int, 2, hi=64),
                   z_channels=v(cfg, source, "latent_channels", int, 16),
                   in_channels=v(cfg, source, "in_channels", int, 3),
                   groups=groups,
                   scaling_factor=v(cfg, source, "scaling_factor", float, 1.5305),
                   shift_factor=v(cfg, source, "shift_factor", float, 0.0609))


def _norm(c: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(c.groups, channels, eps=c.eps)


class ResnetBlock(nn.Module):
    def __init__(self, c: VAEConfig, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(c, cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):  # no .contiguous(): layout-dependent kernels (diffusers 0.42 in eval mode)
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a GroupNorm in front and a residual."""

    def __init__(self, c: VAEConfig, channels: int, attention: str):
        super().__init__()
        self.attention = attention
        self.norm = _norm(c, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if self.attention == "conv_sliced":
            hn = self.norm(x)
            return x + self.proj_out(sliced_attention(self.q(hn), self.k(hn), self.v(hn)))
        if self.attention == "conv":
            hn = self.norm(x)
            q, k, v = (m(hn).flatten(2).transpose(1, 2)[:, None].contiguous() for m in (self.q, self.k, self.v))
            out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
            # back to (B, C, H, W) as a permuted view with the reference's strides (einops: reshape, permute);
            # the 1x1 conv picks its kernel by them, even the batch stride of a batch of 1 (measured in fp16)
            return x + self.proj_out(out.reshape(b, h, w, c).permute(0, 3, 1, 2))
        tokens = self.norm(x.view(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (F.linear(tokens, m.weight[:, :, 0, 0], m.bias).view(b, -1, 1, c).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c).to(q.dtype)  # (B, HW, C)
        out = F.linear(out, self.proj_out.weight[:, :, 0, 0], self.proj_out.bias)
        return out.transpose(-1, -2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding of the LDM autoencoder


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bfloat16 kernel on some devices: both references upcast
            x = x.float()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest").to(dtype))


class Level(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Mid(nn.Module):
    def __init__(self, c: VAEConfig, channels: int, attention: str):
        super().__init__()
        self.block_1, self.block_2 = ResnetBlock(c, channels, channels), ResnetBlock(c, channels, channels)
        self.attn_1 = AttnBlock(c, channels, attention)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig, attention: str):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        chans = [c.ch * m for m in c.ch_mult]
        self.down = nn.ModuleList()
        cin = c.ch
        for i, cout in enumerate(chans):
            level = Level([ResnetBlock(c, cin if j == 0 else cout, cout) for j in range(c.num_res_blocks)])
            if i != len(chans) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = Mid(c, cin, attention)
        self.norm_out, self.conv_out = _norm(c, cin), nn.Conv2d(cin, 2 * c.z_channels, 3, padding=1)

    def stages(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """The encoder as a chain, in execution order: (module name, the function from the previous stage's output
        to this module's output). Teacher forcing runs each on the reference's previous output."""
        out = [("conv_in", self.conv_in)]
        for i, level in enumerate(self.down):
            out += [(f"down.{i}.block.{j}", block) for j, block in enumerate(level.block)]
            if hasattr(level, "downsample"):
                out.append((f"down.{i}.downsample", level.downsample))
        return out + _mid_stages(self.mid) + [("norm_out", self.norm_out),
                                              ("conv_out", lambda h: self.conv_out(F.silu(h)))]

    def forward(self, x: Tensor) -> Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig, attention: str):
        super().__init__()
        chans = [c.ch * m for m in c.ch_mult]
        cin = chans[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = Mid(c, cin, attention)
        levels = []
        for i in reversed(range(len(chans))):  # built deepest first, stored shallowest first (up.0 = full size)
            level = Level([ResnetBlock(c, cin if j == 0 else chans[i], chans[i]) for j in range(c.num_res_blocks + 1)])
            cin = chans[i]
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(c, cin), nn.Conv2d(cin, c.in_channels, 3, padding=1)

    def stages(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """The decoder as a chain, in execution order (see ``Encoder.stages``)."""
        out = [("conv_in", self.conv_in)] + _mid_stages(self.mid)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            out += [(f"up.{i}.block.{j}", block) for j, block in enumerate(level.block)]
            if hasattr(level, "upsample"):
                out.append((f"up.{i}.upsample", level.upsample))
        return out + [("norm_out", self.norm_out), ("conv_out", lambda h: self.conv_out(F.silu(h)))]

    def forward(self, z: Tensor) -> Tensor:
        for _, stage in self.stages():
            z = stage(z)
        return z


def _mid_stages(mid: Mid) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    return [("mid.block_1", mid.block_1), ("mid.attn_1", mid.attn_1), ("mid.block_2", mid.block_2)]


class VAE(nn.Module):
    def __init__(self, config: VAEConfig = VAEConfig(), attention: str = "linear"):
        super().__init__()
        if attention not in ("linear", "conv", "conv_sliced"):
            raise ValueError(f"VAE attention {attention!r}: expected 'linear' (diffusers), 'conv' (SD3.5 reference) or "
                             "'conv_sliced' (ComfyUI's CPU kernel)")
        self.config = config
        self.encoder, self.decoder = Encoder(config, attention), Decoder(config, attention)

    def encode_moments(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """image (B, 3, H, W) in [-1, 1] -> posterior mean and std (B, z, H/8, W/8); logvar clamped to [-30, 20]."""
        mean, logvar = self.encoder(image).chunk(2, dim=1)
        logvar = torch.clamp(logvar, -30.0, 20.0)
        return mean, torch.exp(0.5 * logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def latent_in(self, z: Tensor) -> Tensor:
        """VAE latent -> the transformer's latent space: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def latent_out(self, latent: Tensor) -> Tensor:
        """The transformer's latent -> VAE latent: latent / scale + shift (diffusers' and SAI's order)."""
        return latent / self.config.scaling_factor + self.config.shift_factor
