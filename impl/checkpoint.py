"""SAI single-file checkpoints: split by prefix, infer each model's config from tensor shapes, name the preset.

A checkpoint holds ``model.diffusion_model.*`` (the MMDiT), optionally ``first_stage_model.*`` (the VAE) and
``text_encoders.{clip_l,clip_g,t5xxl}.*``. Configs are never guessed from file names: ``infer_mmdit_config`` and
``infer_vae_config`` read them from shapes and key presence, and ``match_presets`` compares the result with the
real dimensions of the released models.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from impl.mmdit import MMDiTConfig
from impl.vae import VAEConfig
from impl.weights import WeightError

PREFIXES = {"mmdit": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoders": "text_encoders."}

_BASE = dict(context_dim=4096, pooled_dim=2048)
PRESETS: dict[str, MMDiTConfig] = {  # QUIRKS "MMDiT / MMDiT-X" dimensions
    "sd3-medium": MMDiTConfig(depth=24, hidden=1536, heads=24, pos_embed_max_size=192, **_BASE),
    "sd3.5-large": MMDiTConfig(depth=38, hidden=2432, heads=38, pos_embed_max_size=192, qk_norm=True, **_BASE),
    "sd3.5-large-turbo": MMDiTConfig(depth=38, hidden=2432, heads=38, pos_embed_max_size=192, qk_norm=True, **_BASE),
    "sd3.5-medium": MMDiTConfig(depth=24, hidden=1536, heads=24, pos_embed_max_size=384, qk_norm=True,
                                dual_attention_layers=tuple(range(13)), **_BASE),
}
SD3_VAE = VAEConfig()


def split_prefixes(state: dict[str, Tensor], source: str) -> dict[str, dict[str, Tensor]]:
    """{"mmdit": {...}, "vae": {...}, "text_encoders": {...}} with prefixes removed; unknown keys are an error."""
    parts: dict[str, dict[str, Tensor]] = {k: {} for k in PREFIXES}
    unknown = []
    for key, t in state.items():
        for part, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = t
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightError(f"{source}: {len(unknown)} keys outside the SAI layout ({', '.join(PREFIXES.values())}): "
                          + ", ".join(sorted(unknown)[:10]))
    if not parts["mmdit"]:
        raise WeightError(f"{source}: no model.diffusion_model.* keys; not an SD3/SD3.5 SAI checkpoint")
    return parts


def _need(state: dict[str, Tensor], key: str, source: str, ndim: int) -> Tensor:
    if key not in state:
        raise WeightError(f"{source}: missing {key} (needed to infer the config)")
    t = state[key]
    if t.ndim != ndim:
        raise WeightError(f"{source}: {key} has shape {tuple(t.shape)}; expected {ndim} dimensions")
    return t


def infer_mmdit_config(state: dict[str, Tensor], source: str = "MMDiT state") -> MMDiTConfig:
    """From SAI key names (no prefix): hidden/patch/channels from the patch conv, depth from the joint blocks, heads
    from head dim 64 (every released model), the position table side from its length, qk-norm from ``ln_q``, dual
    attention layers from ``attn2`` keys, text widths from the embedders."""
    conv = _need(state, "x_embedder.proj.weight", source, 4)
    hidden, in_ch, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise WeightError(f"{source}: joint_blocks indices {blocks[:5]}... are not 0..n-1")
    if hidden % 64:
        raise WeightError(f"{source}: hidden size {hidden} is not a multiple of the head dim 64")
    pos = _need(state, "pos_embed", source, 3)
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        raise WeightError(f"{source}: pos_embed has {pos.shape[1]} rows, not a square table")
    final = _need(state, "final_layer.linear.weight", source, 2)
    return MMDiTConfig(
        depth=len(blocks), hidden=hidden, heads=hidden // 64, pos_embed_max_size=side,
        context_dim=_need(state, "context_embedder.weight", source, 2).shape[1],
        pooled_dim=_need(state, "y_embedder.mlp.0.weight", source, 2).shape[1],
        qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in state,
        dual_attention_layers=tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state),
        patch=patch, in_channels=in_ch, out_channels=final.shape[0] // (patch * patch))


def infer_vae_config(state: dict[str, Tensor], source: str = "VAE state") -> VAEConfig:
    conv_in = _need(state, "encoder.conv_in.weight", source, 4)
    ch = conv_in.shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    if not levels or not blocks:
        raise WeightError(f"{source}: no encoder.down.* blocks")
    mult = tuple(_need(state, f"encoder.down.{i}.block.0.conv1.weight", source, 4).shape[0] // ch for i in levels)
    z = _need(state, "decoder.conv_in.weight", source, 4).shape[1]
    return replace(SD3_VAE, ch=ch, ch_mult=mult, num_res_blocks=len(blocks), z_channels=z, in_channels=conv_in.shape[1])


def match_presets(config: MMDiTConfig) -> list[str]:
    """Names of the released models with exactly these dimensions (Large and Large-Turbo share them)."""
    return [name for name, preset in PRESETS.items() if preset == config]


def read_sai_checkpoint(path: str | Path) -> dict[str, dict[str, Tensor]]:
    from impl.weights import read_safetensors

    return split_prefixes(read_safetensors(path), str(path))
