"""txt2img / img2img: text encoders, sampler and VAE tied together, every knob an argument.

``form="diffusers"`` is ``StableDiffusion3Pipeline`` / ``StableDiffusion3Img2ImgPipeline`` (bitwise on CPU, see
``tests/test_pipeline_parity.py``); ``form="sai"`` is the SD3.5 reference's ``sd3_infer`` procedure (its sampler,
CFG, fp16 latent, noise and uint8 forms from ``impl.sampling``; pass the matching ``TextSettings`` and
``MMDiTOptions`` / VAE attention for its text side and op orders). Randomness comes from ``seed`` only, except
the SAI img2img posterior, which the reference draws unseeded: pass it as ``posterior_noise`` to reproduce a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from impl import sampling
from impl.text import TextSettings, TextStack, encode_prompt


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    form: str = "diffusers"  # "diffusers" or "sai"
    sampler: str = "euler"  # sai form: "euler" or "dpmpp_2m" (diffusers has Euler only)
    steps: int = 28
    shift: float = 3.0
    guidance: float = 7.0
    seed: int = 0
    height: int = 1024
    width: int = 1024
    dtype: torch.dtype = torch.float32  # the pipeline / model dtype
    slg_layers: tuple[int, ...] = ()
    slg_scale: float | None = None  # default: 2.8 (diffusers), 2.5 (sai)
    slg_start: float = 0.01
    slg_stop: float = 0.2
    strength: float = 0.6  # img2img: diffusers' strength, the reference's denoise


@dataclass
class Result:
    image: Tensor  # (H, W, 3) uint8
    latent: Tensor  # the final latent in the transformer's space


def generate(stack: TextStack, model, vae, prompt: str, s: PipelineSettings, text: TextSettings,
             negative: str = "", init_image: Tensor | None = None, posterior_noise: Tensor | None = None,
             on_step: Callable[[int, dict], None] | None = None) -> Result:
    """One image. ``init_image``: (1, 3, H, W) in [-1, 1] for img2img (``sampling.image_to_tensor`` builds it from
    pixels with diffusers' layout, ``sampling.sai_image_to_tensor`` with the reference's)."""
    if s.form not in ("diffusers", "sai"):
        raise ValueError(f"form {s.form!r}: expected 'diffusers' or 'sai'")
    if s.height % 16 or s.width % 16:
        raise ValueError(f"size {s.height}x{s.width}: height and width must be multiples of 16")
    model, vae = model.to(s.dtype), vae.to(s.dtype)
    text_dtype = s.dtype if s.form == "diffusers" else torch.float32  # sd3_infer.get_cond returns float32
    cond = encode_prompt(stack, prompt, text, text_dtype)
    unc = encode_prompt(stack, negative, text, text_dtype)
    conds = sampling.Conditioning(cond.context, cond.pooled), sampling.Conditioning(unc.context, unc.pooled)
    f = vae.config.downscale
    shape = (1, model.config.in_channels, s.height // f, s.width // f)
    if s.form == "diffusers":
        settings = sampling.SamplerSettings(steps=s.steps, shift=s.shift, guidance=s.guidance, slg_layers=s.slg_layers,
                                            slg_scale=2.8 if s.slg_scale is None else s.slg_scale,
                                            slg_start=s.slg_start, slg_stop=s.slg_stop)
        generator = torch.Generator("cpu").manual_seed(s.seed)
        if init_image is None:
            latents = sampling.denoise(model, torch.randn(shape, dtype=s.dtype, generator=generator), *conds,
                                       settings, on_step=on_step)
        else:
            start_latent, start = sampling.img2img_latent(vae, init_image.to(s.dtype), settings, s.strength, generator)
            latents = sampling.denoise(model, start_latent, *conds, settings, on_step=on_step, start=start)
        image = vae.decode(vae.latent_out(latents))
        return Result(sampling.to_uint8(image)[0], latents)
    sai = sampling.SaiSettings(steps=s.steps, shift=s.shift, guidance=s.guidance, sampler=s.sampler,
                               model_dtype=s.dtype, slg_layers=s.slg_layers,
                               slg_scale=2.5 if s.slg_scale is None else s.slg_scale, slg_start=s.slg_start,
                               slg_end=s.slg_stop, denoise=1.0 if init_image is None else s.strength)
    start_latent = None
    if init_image is not None:  # vae_encode: posterior sample, then process_in
        mean, std = vae.encode_moments(init_image.to(s.dtype))
        if posterior_noise is None:
            posterior_noise = torch.randn(mean.shape, generator=torch.Generator("cpu").manual_seed(s.seed + 1))
        start_latent = vae.latent_in(mean + std * posterior_noise.to(mean.dtype)).float()
    noise = sampling.sai_noise(s.seed, shape, sai.latent_dtype)
    latents = sampling.sai_denoise(model, noise, *conds, sai, latent=start_latent, on_step=on_step)
    image = vae.decode(vae.latent_out(latents).to(s.dtype))  # process_out, then the VAE in its dtype
    return Result(sampling.sai_to_uint8(image)[0], latents)
