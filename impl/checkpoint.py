"""SAI single-file checkpoints: split by prefix, infer each model's config from tensor shapes, name the preset.

A checkpoint holds ``model.diffusion_model.*`` (the MMDiT), optionally ``first_stage_model.*`` (the VAE) and
``text_encoders.{clip_l,clip_g,t5xxl}.*``. Configs are never guessed from file names: ``infer_mmdit_config`` and
``infer_vae_config`` read them from shapes and key presence, and ``match_presets`` compares the result with the
real dimensions of the released models.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from torch import Tensor

from impl.clip import ClipConfig
from impl.mmdit import MMDiTConfig
from impl.t5 import T5Config
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


def _by_prefix(state: dict[str, Tensor], prefixes: dict[str, str], source: str, what: str) -> dict[str, dict]:
    """Split ``state`` by key prefix (removed); a key matching none is an error naming ``what`` was expected."""
    parts: dict[str, dict[str, Tensor]] = {k: {} for k in prefixes}
    unknown = []
    for key, t in state.items():
        part = next((p for p, prefix in prefixes.items() if key.startswith(prefix)), None)
        if part is None:
            unknown.append(key)
        else:
            parts[part][key[len(prefixes[part]):]] = t
    if unknown:
        raise WeightError(f"{source}: {len(unknown)} keys outside {what} ({', '.join(prefixes.values())}): "
                          + ", ".join(sorted(unknown)[:10]))
    return parts


def split_prefixes(state: dict[str, Tensor], source: str) -> dict[str, dict[str, Tensor]]:
    """{"mmdit": {...}, "vae": {...}, "text_encoders": {...}} with prefixes removed; unknown keys are an error."""
    parts = _by_prefix(state, PREFIXES, source, "the SAI layout")
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


def _settle(shapes: dict, given, defaults: dict, source: str, what: str) -> tuple[dict, list[str]]:
    """Config values: those the shapes fix (``shapes``), then those only a config can carry, from ``given`` (a
    config read from a file) or else ``defaults`` (value, reason), each such default noted. A given config whose
    values contradict the shapes is an error naming the field."""
    values, notes = dict(shapes), []
    if given is not None:
        bad = [f"{k} {getattr(given, k)!r} vs {v!r}" for k, v in shapes.items() if getattr(given, k) != v]
        if bad:
            raise WeightError(f"{source}: the given {what} config contradicts the file's shapes: {', '.join(bad)}")
        values.update({k: getattr(given, k) for k in defaults})
    else:
        values.update({k: v for k, (v, _) in defaults.items()})
        notes += [f"{what} {k} = {v!r} inferred ({why}); give the model's configs to override"
                  for k, (v, why) in defaults.items()]
    return values, notes


def infer_mmdit(state: dict[str, Tensor], source: str = "MMDiT state", given: MMDiTConfig | None = None
                ) -> tuple[MMDiTConfig, list[str]]:
    """From SAI key names (no prefix): hidden/patch/channels from the patch conv, depth from the joint blocks, the
    position table side from its length, qk-norm from ``ln_q``, dual attention layers from ``attn2`` keys, text
    widths from the embedders, the head count from the qk-norm weight (one head wide). Without qk-norm the head
    count is in no shape: ``given``'s, else hidden / 64 (every released model, and the SD3.5 code's rule
    hidden = 64 * depth). Returns the config and notes of what was inferred."""
    conv = _need(state, "x_embedder.proj.weight", source, 4)
    hidden, in_ch, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise WeightError(f"{source}: joint_blocks indices {blocks[:5]}... are not 0..n-1")
    pos = _need(state, "pos_embed", source, 3)
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        raise WeightError(f"{source}: pos_embed has {pos.shape[1]} rows, not a square table")
    final = _need(state, "final_layer.linear.weight", source, 2)
    shapes = dict(depth=len(blocks), hidden=hidden, pos_embed_max_size=side,
                  context_dim=_need(state, "context_embedder.weight", source, 2).shape[1],
                  pooled_dim=_need(state, "y_embedder.mlp.0.weight", source, 2).shape[1],
                  qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in state,
                  dual_attention_layers=tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state),
                  patch=patch, in_channels=in_ch, out_channels=final.shape[0] // (patch * patch))
    ln_q = state.get("joint_blocks.0.x_block.attn.ln_q.weight")
    if ln_q is not None and ln_q.ndim == 1 and ln_q.shape[0] and hidden % ln_q.shape[0] == 0:
        shapes["heads"] = hidden // ln_q.shape[0]  # the qk-norm weight is one head wide
        defaults = {}
    else:
        if given is None and hidden % 64:
            raise WeightError(f"{source}: hidden size {hidden} is not a multiple of the head dim 64 of the released "
                              "models; give the model's transformer config (num_attention_heads)")
        defaults = {"heads": (hidden // 64, f"hidden {hidden} / head dim 64")}
    values, notes = _settle(shapes, given, defaults, source, "transformer")
    if hidden % values["heads"]:
        raise WeightError(f"{source}: hidden size {hidden} is not divisible by {values['heads']} heads")
    return MMDiTConfig(**values), notes


def infer_mmdit_config(state: dict[str, Tensor], source: str = "MMDiT state") -> MMDiTConfig:
    return infer_mmdit(state, source)[0]


def infer_vae(state: dict[str, Tensor], source: str = "VAE state", given: VAEConfig | None = None
              ) -> tuple[VAEConfig, list[str]]:
    conv_in = _need(state, "encoder.conv_in.weight", source, 4)
    ch = conv_in.shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    if not levels or not blocks:
        raise WeightError(f"{source}: no encoder.down.* blocks")
    mult = tuple(_need(state, f"encoder.down.{i}.block.0.conv1.weight", source, 4).shape[0] // ch for i in levels)
    z = _need(state, "decoder.conv_in.weight", source, 4).shape[1]
    shapes = dict(ch=ch, ch_mult=mult, num_res_blocks=len(blocks), z_channels=z, in_channels=conv_in.shape[1])
    defaults = {k: (getattr(SD3_VAE, k), "the SD3 VAE's") for k in ("groups", "eps", "scaling_factor", "shift_factor")}
    values, notes = _settle(shapes, given, defaults, source, "vae")
    return VAEConfig(**values), notes


def infer_vae_config(state: dict[str, Tensor], source: str = "VAE state") -> VAEConfig:
    return infer_vae(state, source)[0]


# CLIP heads are not in any tensor shape: by width, the released towers (CLIP-L 768/12, CLIP-G 1280/20) and the
# embedded tiny ones (32/4, 48/3)
CLIP_HEADS = {768: 12, 1280: 20, 32: 4, 48: 3}
TEXT_PREFIXES = {"clip_l": "clip_l.transformer.", "clip_g": "clip_g.transformer.", "t5": "t5xxl.transformer."}


def split_text_encoders(state: dict[str, Tensor], source: str) -> dict[str, dict[str, Tensor]]:
    """``text_encoders.*`` keys (prefix already removed) -> {"clip_l", "clip_g", "t5"} with transformers names."""
    return {k: v for k, v in _by_prefix(state, TEXT_PREFIXES, source, "the text encoders").items() if v}


def infer_clip(state: dict[str, Tensor], which: str, source: str, given: ClipConfig | None = None
               ) -> tuple[ClipConfig, list[str]]:
    tok = _need(state, "text_model.embeddings.token_embedding.weight", source, 2)
    width = tok.shape[1]
    if given is None and width not in CLIP_HEADS:
        raise WeightError(f"{source}: CLIP width {width} has no known head count ({sorted(CLIP_HEADS)}); give the "
                          "model's text encoder configs")
    layers = len({m.group(1) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    proj = state.get("text_projection.weight")
    shapes = dict(vocab_size=tok.shape[0], width=width, layers=layers,
                  intermediate=_need(state, "text_model.encoder.layers.0.mlp.fc1.weight", source, 2).shape[0],
                  projection_dim=width if proj is None else proj.shape[0],
                  max_positions=_need(state, "text_model.embeddings.position_embedding.weight", source, 2).shape[0])
    defaults = {"heads": (CLIP_HEADS.get(width), f"the known tower of width {width}"),
                "activation": ("quick_gelu" if which == "clip_l" else "gelu", f"{which}'s"),
                "eps": (1e-5, "transformers' CLIPTextConfig default")}
    values, notes = _settle(shapes, given, defaults, source, which)
    return ClipConfig(**values), notes


def infer_clip_config(state: dict[str, Tensor], which: str, source: str) -> ClipConfig:
    return infer_clip(state, which, source)[0]


def infer_t5(state: dict[str, Tensor], source: str, given: T5Config | None = None) -> tuple[T5Config, list[str]]:
    emb = state.get("encoder.embed_tokens.weight", state.get("shared.weight"))
    if emb is None:
        raise WeightError(f"{source}: missing encoder.embed_tokens.weight / shared.weight")
    bias = _need(state, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", source, 2)
    inner = _need(state, "encoder.block.0.layer.0.SelfAttention.q.weight", source, 2).shape[0]
    layers = len({m.group(1) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    shapes = dict(vocab_size=emb.shape[0], d_model=emb.shape[1], heads=bias.shape[1], d_kv=inner // bias.shape[1],
                  d_ff=_need(state, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", source, 2).shape[0],
                  layers=layers, num_buckets=bias.shape[0])
    defaults = {"max_distance": (128, "T5 v1.1's"), "eps": (1e-6, "T5 v1.1's"),
                "activation": ("gelu_new", "gated-gelu in transformers")}
    values, notes = _settle(shapes, given, defaults, source, "t5")
    return T5Config(**values), notes


def infer_t5_config(state: dict[str, Tensor], source: str) -> T5Config:
    return infer_t5(state, source)[0]


def load_text_encoders(state: dict[str, Tensor], source: str, given: dict | None = None,
                       clip_l_projection: str = "file") -> tuple[dict, dict, list[str], dict]:
    """impl encoders from a single file's ``text_encoders.*`` part. ``given``: {"clip_l", "clip_g", "t5"} configs
    read from the model's config files (values no shape carries). Returns (the modules present, the state dict
    each was loaded from, notes, each encoder's scaled-fp8 layers, dequantized in float32). A CLIP-L without
    ``text_projection`` (the SD3.5 reference never projects it) gets the identity, which is what the SD3 diffusers
    repositories ship (QUIRKS T6), and the notes say so; ``clip_l_projection="identity"`` uses the identity even
    when the file has one."""
    if clip_l_projection not in ("file", "identity"):
        raise ValueError(f"clip_l_projection {clip_l_projection!r}: expected 'file' or 'identity'")
    import torch

    from impl.clip import ClipTextEncoder
    from impl.t5 import T5Encoder
    from impl.text import CLIP_DROP, T5_TIED
    from impl.weights import load_strict

    from impl import quant

    given = given or {}
    models, states, notes, quantized = {}, {}, [], {}
    for name, part in split_text_encoders(state, source).items():
        where = f"{source} (text_encoders.{TEXT_PREFIXES[name]}*)"
        if quant.is_quantized(part):  # encoders compute in float32
            part, quantized[name] = quant.dequantize(part, torch.float32, where)
        if name == "t5":
            config, inferred = infer_t5(part, where, given.get("t5"))
            model = T5Encoder(config)
            load_strict(model, part, where, tied=T5_TIED)
        else:
            config, inferred = infer_clip(part, name, where, given.get(name))
            if name == "clip_l" and clip_l_projection == "identity" and "text_projection.weight" in part:
                part = {**part, "text_projection.weight": torch.eye(config.width)}
            elif "text_projection.weight" not in part:
                part = {**part, "text_projection.weight": torch.eye(config.width)}
                notes.append(f"{name}: no text_projection in the file; using the identity (as the SD3 diffusers "
                             "repositories ship it)")
            model = ClipTextEncoder(config)
            load_strict(model, part, where, drop=CLIP_DROP)
        notes += inferred
        models[name], states[name] = model.eval(), part
    return models, states, notes, quantized


def match_presets(config: MMDiTConfig) -> list[str]:
    """Names of the released models with exactly these dimensions (Large and Large-Turbo share them)."""
    return [name for name, preset in PRESETS.items() if preset == config]


def read_sai_checkpoint(path: str | Path) -> dict[str, dict[str, Tensor]]:
    from impl.weights import read_safetensors

    return split_prefixes(read_safetensors(path), str(path))
