"""A model the project never made: built with diffusers' and transformers' own classes at configurations that differ
from every embedded and released one in what no tensor shape shows (4 heads of 32 in the MMDiT, CLIP-L width 32
with 2 heads, CLIP-G width 48 with 4 heads, T5 relative_attention_max_distance 64, VAE with 16 norm groups), saved
with their own ``save_pretrained``. Weights are seeded normals, so the model is the same on every run."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=128, pooled_projection_dim=80,
                   pos_embed_max_size=16, qk_norm="rms_norm")
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 64, 64], layers_per_block=1,
           latent_channels=16, norm_num_groups=16, use_quant_conv=False, use_post_quant_conv=False,
           scaling_factor=1.5305, shift_factor=0.0609)
CLIP_L = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
              hidden_act="quick_gelu", projection_dim=32, max_position_embeddings=77, eos_token_id=2, bos_token_id=0,
              pad_token_id=1)
CLIP_G = dict(CLIP_L, hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act="gelu", projection_dim=48)
T5 = dict(vocab_size=448, d_model=96, d_kv=16, num_heads=6, d_ff=160, num_layers=2, feed_forward_proj="gated-gelu",
          relative_attention_max_distance=64, dropout_rate=0.0)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            scale = 0.1 if p.ndim == 1 else 1.0 / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and p.ndim == 1 else 0.0))


def build(target: Path, embedded_dir: Path) -> Path:
    """The model in diffusers layout at ``target``; tokenizers and the scheduler config from ``embedded_dir``."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    parts = {"transformer": SD3Transformer2DModel(**TRANSFORMER), "vae": AutoencoderKL(**VAE),
             "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
             "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
             "text_encoder_3": T5EncoderModel(T5Config(**T5))}
    for seed, (sub, model) in enumerate(parts.items()):
        _randomize(model, seed)
        model.save_pretrained(target / sub)
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        shutil.copytree(embedded_dir / sub, target / sub)
    shutil.copyfile(embedded_dir / "model_index.json", target / "model_index.json")
    return target
