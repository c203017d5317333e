"""Flow-matching sampling as pure functions: sigma schedules, CFG, skip-layer guidance, Euler, and the txt2img
loop that ties a transformer and a VAE together. All randomness comes in as tensors (``noise``).

Implemented so far: the diffusers forms (``FlowMatchEulerDiscreteScheduler`` schedule and step, CFG on the
velocity with the batch [uncond, cond], skip-layer guidance on the loop index; QUIRKS S3, S6, G2, G3, G5).
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
            on_step: Callable[[int, dict], None] | None = None) -> Tensor:
    """diffusers' StableDiffusion3Pipeline loop. ``noise`` (1, C, h, w) is the initial latent; ``on_step(i, d)``
    sees the sigma, timestep, model output, guided velocity and new latent of step ``i``."""
    sigmas, timesteps = diffusers_schedule(s.steps, s.shift)
    cfg = s.guidance > 1
    context = torch.cat([uncond.context, cond.context]) if cfg else cond.context
    pooled = torch.cat([uncond.pooled, cond.pooled]) if cfg else cond.pooled
    latents = noise
    for i, t in enumerate(timesteps):
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


def to_uint8(image: Tensor) -> Tensor:
    """diffusers' postprocess: (x * 0.5 + 0.5).clamp(0, 1) in the VAE dtype, to float32, * 255, round (QUIRKS V3).
    (B, 3, H, W) -> (B, H, W, 3) uint8."""
    x = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    return (x * 255).round().to(torch.uint8)
