"""Flow-matching sampling as pure functions: sigma schedules, CFG, skip-layer guidance, Euler, and the txt2img
loop that ties a transformer and a VAE together. All randomness comes in as tensors (``noise``).

Two families of forms, each exactly as its reference computes it:

* diffusers: ``FlowMatchEulerDiscreteScheduler`` schedule and step, CFG on the velocity with the batch
  [uncond, cond] and only when guidance > 1, skip-layer guidance on the loop index (QUIRKS S3, S6, G2, G3, G5);
* SD3.5 reference (``sd3_impls`` / ``sd3_infer``): float32 torch schedule, k-diffusion Euler and DPM-Solver++(2M)
  on x0 predictions, CFG on x0 with the batch [cond, uncond] at any guidance, the float16 latent whose dtype
  rounds every timestep (S4) until the first update makes it float32 (S5), the img2img start index (S7) and the
  truncating uint8 conversion (V3), and its skip-layer guidance (G5: window on the denoiser call count, a third
  forward on cond only, (cond - skip) * scale added to the CFG'd x0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor


def shift_sigmas(s, shift: float):
    """sigma(s) = shift*s / (1 + (shift-1)*s), evaluated in the type of ``s`` (tensor or numpy array)."""
    return shift * s / (1 + (shift - 1) * s)


def diffusers_schedule(steps: int, shift: float, train_steps: int = 1000) -> tuple[Tensor, Tensor]:
    """(sigmas with a final 0, float32 (steps+1,), timesteps float32 (steps,)) as diffusers builds them: the 1000
    training sigmas shifted in float32, their ends spanned by ``np.linspace`` in float64 and shifted a second time
    in float64, then cast to float32 (QUIRKS S3)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    train = torch.from_numpy(np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1].copy()) / train_steps
    train = shift_sigmas(train, shift)
    t = np.linspace(train[0].item() * train_steps, train[-1].item() * train_steps, steps)
    sigmas = torch.from_numpy(shift_sigmas(t / train_steps, shift)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)]), sigmas * train_steps


def euler_step(sample: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """diffusers' step: in float32, x + (sigma_next - sigma) * v, cast back to the velocity's dtype (QUIRKS S5/S6)."""
    return (sample.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


@dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    steps: int = 28
    shift: float = 3.0
    guidance: float = 7.0  # CFG runs when guidance > 1 (diffusers' do_classifier_free_guidance)
    slg_layers: tuple[int, ...] = ()  # skip-layer guidance (diffusers: off unless skip_guidance_layers is given)
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_stop: float = 0.2


@dataclass
class Conditioning:
    context: Tensor  # (1, L, joint)
    pooled: Tensor  # (1, P)


Model = Callable[..., Tensor]  # (x, t, y, context, skip_layers=()) -> velocity


def denoise(model: Model, noise: Tensor, cond: Conditioning, uncond: Conditioning, s: SamplerSettings,
            on_step: Callable[[int, dict], None] | None = None, start: int = 0) -> Tensor:
    """diffusers' StableDiffusion3Pipeline loop. ``noise`` (1, C, h, w) is the initial latent; ``on_step(i, d)``
    sees the sigma, timestep, model output, guided velocity and new latent of step ``i``. ``start`` > 0 begins
    at that schedule index (img2img; ``noise`` is then the noised image latent)."""
    sigmas, timesteps = diffusers_schedule(s.steps, s.shift)
    cfg = s.guidance > 1
    context = torch.cat([uncond.context, cond.context]) if cfg else cond.context
    pooled = torch.cat([uncond.pooled, cond.pooled]) if cfg else cond.pooled
    latents = noise
    for i, t in enumerate(timesteps):
        if i < start:
            continue
        x = torch.cat([latents] * 2) if cfg else latents
        out = model(x, t.expand(x.shape[0]), pooled, context)
        v = out
        if cfg:
            v_uncond, v_cond = out.chunk(2)
            v = v_uncond + s.guidance * (v_cond - v_uncond)
            if s.slg_layers and s.steps * s.slg_start < i < s.steps * s.slg_stop:
                v_skip = model(latents, t.expand(latents.shape[0]), cond.pooled, cond.context, skip_layers=s.slg_layers)
                v = v + (v_cond - v_skip) * s.slg_scale
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if on_step is not None:
            on_step(i, {"sigma": sigmas[i], "timestep": t, "model_output": out, "velocity": v, "latent": latents})
    return latents


def diffusers_start_index(steps: int, strength: float) -> int:
    """img2img: ``t_start = int(max(N - min(N * strength, N), 0))`` (strength 0.8 of 40 -> 8; QUIRKS S7)."""
    return int(max(steps - min(steps * strength, steps), 0))


def image_to_tensor(pixels) -> Tensor:
    """(H, W, 3) uint8 array -> (1, 3, H, W) in [-1, 1] as diffusers' ``VaeImageProcessor.preprocess`` builds it:
    float32 / 255 in numpy, then a *transposed view* (channels-last strides), then 2x - 1. The layout matters on
    CPU: convolutions and GroupNorm take their channels-last kernels for it, and the VAE encoder's posterior
    mean differs from a contiguous input's by ulps (measured; impl mirrors the layout rather than copying)."""
    import numpy as np

    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return 2.0 * torch.from_numpy(arr[None].astype(np.float32) / 255.0).permute(0, 3, 1, 2) - 1.0


def img2img_latent(vae, image: Tensor, s: SamplerSettings, strength: float, generator: torch.Generator) -> tuple[Tensor, int]:
    """diffusers' StableDiffusion3Img2ImgPipeline.prepare_latents: posterior sample (mean + std * randn, drawn
    first from ``generator``), into the transformer's latent space, then noise (drawn second) mixed in at the
    start sigma. ``image`` (1, 3, H, W) in [-1, 1], in the VAE dtype. Returns (latent, start index)."""
    start = diffusers_start_index(s.steps, strength)
    if start >= s.steps:
        raise ValueError(f"strength {strength} leaves no denoising step out of {s.steps}")
    mean, std = vae.encode_moments(image)
    sample = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    z = vae.latent_in(sample)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    sigma = diffusers_schedule(s.steps, s.shift)[0].to(z.dtype)[start]
    return sigma * noise + (1.0 - sigma) * z, start


# ---------------------------------------------------------------------------------------------- SD3.5 reference

def sai_schedule(steps: int, shift: float, train_steps: int = 1000) -> Tensor:
    """``SD3Inferencer.get_sigmas``: the float32 table sigma(t/1000) for t = 1..1000, its ends times 1000 spanned
    by ``torch.linspace`` in float32, each point shifted again (no formula when shift == 1), then 0 (QUIRKS S3)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def sigma(t: Tensor) -> Tensor:
        t = t / 1000.0
        return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)

    table = sigma(torch.arange(1, train_steps + 1, 1))
    timesteps = torch.linspace(table[-1] * 1000, table[0] * 1000, steps)
    return torch.tensor([float(sigma(ts)) for ts in timesteps] + [0.0], dtype=torch.float32)


def sai_start_index(steps: int, denoise: float) -> int:
    """img2img: the reference keeps ``sigmas[int(steps * (1 - denoise)):]`` (1 - 0.8 = 0.19999.. -> 7 of 40)."""
    return int(steps * (1 - denoise))


@dataclass(frozen=True, kw_only=True)
class SaiSettings:
    steps: int = 40
    shift: float = 3.0
    guidance: float = 4.5
    sampler: str = "dpmpp_2m"  # or "euler"
    latent_dtype: torch.dtype = torch.float16  # sd3_infer: latent.half() (QUIRKS S4, S5)
    model_dtype: torch.dtype = torch.float16  # BaseModel.apply_model casts x, context and y to it
    cond_dtype: torch.dtype = torch.float16  # fix_cond: context and pooled .half(), whatever the model dtype
    empty_latent: float = 0.0609  # get_empty_latent: ones * 0.0609
    denoise: float = 1.0
    slg_layers: tuple[int, ...] = ()  # SkipLayerCFGDenoiser (the 3.5-Medium profile: 7, 8, 9)
    slg_scale: float = 2.5
    slg_start: float = 0.01
    slg_end: float = 0.20


def sai_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``get_noise``: float32 CPU ``randn`` from ``torch.manual_seed(seed)``'s generator, cast to the latent dtype."""
    return torch.randn(shape, dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(seed)).to(dtype)


def _sai_x0(model: Model, x: Tensor, sigma: Tensor, pooled: Tensor, context: Tensor, model_dtype: torch.dtype,
            skip_layers: tuple[int, ...] = ()) -> Tensor:
    """``BaseModel.apply_model``: timestep ``(sigma * 1000).float()`` from ``sigma`` in the latent's dtype (S4),
    inputs cast to the model dtype, x0 = x - v * sigma with v in float32."""
    kwargs = {"skip_layers": skip_layers} if skip_layers else {}
    v = model(x.to(model_dtype), (sigma * 1000).float(), pooled.to(model_dtype), context.to(model_dtype), **kwargs).float()
    return x - v * sigma.view(sigma.shape[:1] + (1,) * (v.ndim - 1))


def sai_cfg_x0(model: Model, x: Tensor, sigma: Tensor, cond: Conditioning, uncond: Conditioning,
               guidance: float, model_dtype: torch.dtype, skip: tuple[tuple[int, ...], float] | None = None) -> Tensor:
    """``CFGDenoiser``: batch [cond, uncond] whatever the guidance (G3), CFG on x0 (G2): uncond + (cond - uncond)
    * scale. ``skip`` = (layers, scale) adds ``SkipLayerCFGDenoiser``'s (cond - skip) * scale (G5)."""
    x0 = _sai_x0(model, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond.pooled, uncond.pooled]),
                 torch.cat([cond.context, uncond.context]), model_dtype)
    pos, neg = x0.chunk(2)
    scaled = neg + (pos - neg) * guidance
    if skip is not None:
        skipped = _sai_x0(model, x, sigma, cond.pooled, cond.context, model_dtype, skip[0])
        scaled = scaled + (pos - skipped) * skip[1]
    return scaled


def sai_denoise(model: Model, noise: Tensor, cond: Conditioning, uncond: Conditioning, s: SaiSettings,
                latent: Tensor | None = None, on_step: Callable[[int, dict], None] | None = None) -> Tensor:
    """``SD3Inferencer.do_sampling`` without the device moves: returns the latent after the last step (the caller
    applies ``process_out``). ``latent`` is the img2img start latent (default: the constant empty latent)."""
    if s.sampler not in ("euler", "dpmpp_2m"):
        raise ValueError(f"sampler {s.sampler!r}: expected 'euler' or 'dpmpp_2m'")
    dtype = s.latent_dtype
    cond, uncond = (Conditioning(c.context.to(s.cond_dtype), c.pooled.to(s.cond_dtype)) for c in (cond, uncond))
    base = (torch.ones(noise.shape) * s.empty_latent if latent is None else latent).to(dtype)
    sigmas = sai_schedule(s.steps, s.shift)[sai_start_index(s.steps, s.denoise):]
    x = sigmas[0] * noise.to(dtype) + (1.0 - sigmas[0]) * base  # noise_scaling, in the latent dtype
    s_in = x.new_ones([x.shape[0]])  # made once: the latent dtype stays in every sigma * s_in (S4)
    old = None
    for i in range(len(sigmas) - 1):
        window = s.slg_layers and s.slg_start * s.steps < i < s.slg_end * s.steps  # the denoiser's call count
        denoised = sai_cfg_x0(model, x, sigmas[i] * s_in, cond, uncond, s.guidance, s.model_dtype,
                              (s.slg_layers, s.slg_scale) if window else None)
        if s.sampler == "euler":
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old is None or sigmas[i + 1] == 0:
                x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised
            else:
                r = (t + sigmas[i - 1].log()) / h
                x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised
                                                                        - (1 / (2 * r)) * old)
            old = denoised
        if on_step is not None:
            on_step(i, {"sigma": sigmas[i], "timestep": (sigmas[i] * s_in * 1000).float(), "x0": denoised,
                        "latent": x})
    return x


def sai_image_to_tensor(pixels) -> Tensor:
    """``vae_encode``'s preprocessing: (H, W, 3) uint8 -> float32 / 255 in numpy, channels first, a contiguous
    (1, 3, H, W) copy, then 2x - 1 in torch (contiguous, unlike diffusers' layout in ``image_to_tensor``)."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    chw = np.moveaxis(arr.astype(np.float32) / 255.0, 2, 0)
    return 2.0 * torch.from_numpy(np.ascontiguousarray(chw[None])) - 1.0


def sai_to_uint8(image: Tensor) -> Tensor:
    """``vae_decode``: float32, clamp((x + 1) / 2, 0, 1), 255 * x, **truncated** to uint8 (QUIRKS V3)."""
    x = torch.clamp((image.float() + 1.0) / 2.0, min=0.0, max=1.0).permute(0, 2, 3, 1)
    return (255.0 * x).to(torch.uint8)


def to_uint8(image: Tensor) -> Tensor:
    """diffusers' postprocess: (x * 0.5 + 0.5).clamp(0, 1) in the VAE dtype, to float32, * 255, round (QUIRKS V3).
    (B, 3, H, W) -> (B, H, W, 3) uint8."""
    x = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    return (x * 255).round().to(torch.uint8)
