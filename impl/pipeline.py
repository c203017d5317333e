"""txt2img / img2img: text encoders, sampler and VAE tied together, every knob an argument.

With ``sampling.Form()`` and ``uint8="round"`` this is ``StableDiffusion3Pipeline`` /
``StableDiffusion3Img2ImgPipeline`` (bitwise on CPU, see ``tests/test_pipeline_parity.py``); with the SD3.5 code's
and ``uint8="truncate"`` it is the SD3.5 reference's ``sd3_infer`` procedure (pass the matching ``TextSettings``
and ``MMDiTOptions`` / VAE attention for its text side and op orders). Randomness comes from ``seed``; the SAI
img2img posterior, which the reference draws unseeded, can be given as ``posterior_noise``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from impl import sampling
from impl.autocast import CudaAutocastFp16
from impl.text import Conditioning, Prompt, TextSettings, TextStack, encode_prompt


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    sampler: sampling.SamplerSettings = field(default_factory=sampling.SamplerSettings)
    seed: int = 0
    height: int = 1024
    width: int = 1024
    strength: float = 0.6  # img2img: diffusers' strength, the reference's denoise
    uint8: str = "round"  # V3: "round" (diffusers) or "truncate" (the reference)
    autocast: bool = False  # N2/V2: the sampler and the VAE under CUDA autocast's float16 policy (the reference)
    unpadded_negative: bool = False  # the empty negative without padding (ComfyUI's CLIPTextEncodeSD3 "none")
    unpadded_prompt: bool = False  # the prompt's empty per-encoder texts without padding (the same node's "none")


@dataclass
class Result:
    image: Tensor  # (H, W, 3) uint8
    latent: Tensor  # the final latent in the transformer's space


def generate(stack: TextStack, model, vae, prompt: Prompt, s: PipelineSettings, text: TextSettings,
             negative: str = "", init_image: Tensor | None = None, posterior_noise: Tensor | None = None,
             on_step: Callable[[int, dict], None] | None = None, cond: Conditioning | None = None) -> Result:
    """One image. ``init_image``: (1, 3, H, W) in [-1, 1] for img2img (``sampling.image_to_tensor`` builds it from
    pixels with diffusers' layout, ``sampling.sai_image_to_tensor`` with the reference's). ``cond``: the prompt's
    conditioning as ``encode_prompt`` gave it for these settings, dtype and the model's context width (not encoded
    again)."""
    ss = s.sampler
    if s.height % 16 or s.width % 16:
        raise ValueError(f"size {s.height}x{s.width}: height and width must be multiples of 16")
    if s.uint8 not in ("round", "truncate"):
        raise ValueError(f"uint8 {s.uint8!r}: expected 'round' or 'truncate'")
    model, vae = model.to(ss.dtype), vae.to(ss.dtype)
    text_dtype = text.encoder_dtype or ss.dtype  # the reference's get_cond returns its float32 encoders' output
    if cond is None:
        cond = encode_prompt(stack, prompt, text, text_dtype, model.config.context_dim, s.unpadded_prompt)
    if s.unpadded_negative:
        if negative:
            raise ValueError("unpadded_negative encodes the empty negative; the negative is not empty")
        negative = ("", "", "")
    unc = encode_prompt(stack, negative, text, text_dtype, model.config.context_dim, s.unpadded_negative)
    conds = sampling.Conditioning(cond.context, cond.pooled), sampling.Conditioning(unc.context, unc.pooled)
    f = vae.config.downscale
    shape = (1, model.config.in_channels, s.height // f, s.width // f)
    scope = CudaAutocastFp16 if s.autocast else contextlib.nullcontext
    start, base = 0, None
    if init_image is None:
        noise, _ = sampling.draws(ss, s.seed, shape)
    else:
        ss, start = sampling.img2img_plan(ss, s.strength)
        with scope():  # under autocast the first convolution casts the image; without it, the VAE dtype
            mean, std = vae.encode_moments(init_image if s.autocast else init_image.to(ss.dtype))
        if ss.form.img2img == "mean":  # ComfyUI: the posterior's mean, and the noise alone from the seed
            noise, base = sampling.draws(ss, s.seed, shape)[0], vae.latent_in(mean)
        else:
            noise, drawn = sampling.draws(ss, s.seed, shape, tuple(mean.shape))
            base = vae.latent_in(mean + std * (drawn if posterior_noise is None else posterior_noise).to(mean.dtype))
    with scope():
        latents = sampling.denoise(model, sampling.start_latent(ss, noise, base, start), *conds, ss, start, on_step)
    z = vae.latent_out(latents)  # process_out
    with scope():
        image = vae.decode(z if s.autocast else z.to(ss.dtype))
    return Result((sampling.to_uint8 if s.uint8 == "round" else sampling.sai_to_uint8)(image)[0], latents)
