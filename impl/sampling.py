"""Flow-matching sampling as pure functions: sigma schedules, the noise and start latent, and one denoising loop
(CFG, skip-layer guidance, Euler and DPM-Solver++(2M) updates). Randomness comes in as tensors or seeds.

Each quirk between the two references is one field of ``Form`` with plain values, so any one can be switched
alone (``parity.flags`` maps each reference's choice to them):

* ``Form()`` is diffusers' ``StableDiffusion3Pipeline``: ``FlowMatchEulerDiscreteScheduler`` schedule and step, CFG
  on the velocity with the batch [uncond, cond] and only when guidance > 1, the latent back in the model dtype after
  every step, skip-layer guidance added to the velocity (QUIRKS S3, S5, S6, G2, G3, G5);
* the SD3.5 reference (``sd3_impls`` / ``sd3_infer``) is a float32 torch schedule, k-diffusion Euler and
  DPM-Solver++(2M) on x0 predictions, CFG on x0 with the batch [cond, uncond] at any guidance, the float16 latent
  whose dtype rounds every timestep (S4) until the first update makes it float32 (S5), ``fix_cond``'s float16
  conditioning, the img2img start index (S7), skip-layer guidance on the CFG'd x0 (G5), and the truncating uint8
  conversion (V3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
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


def diffusers_start_index(steps: int, strength: float) -> int:
    """img2img: ``t_start = int(max(N - min(N * strength, N), 0))`` (strength 0.8 of 40 -> 8; QUIRKS S7)."""
    return int(max(steps - min(steps * strength, steps), 0))


def image_to_tensor(pixels) -> Tensor:
    """(H, W, 3) uint8 array -> (1, 3, H, W) in [-1, 1] as diffusers' ``VaeImageProcessor.preprocess`` builds it:
    float32 / 255 in numpy, then a *transposed view* (channels-last strides), then 2x - 1. The layout matters on
    CPU: convolutions and GroupNorm take their channels-last kernels for it, and the VAE encoder's posterior
    mean differs from a contiguous input's by ulps (measured; impl mirrors the layout rather than copying)."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return 2.0 * torch.from_numpy(arr[None].astype(np.float32) / 255.0).permute(0, 3, 1, 2) - 1.0


# ---------------------------------------------------------------------------------------------- SD3.5 reference

def _flow_sigma(t: Tensor, shift: float) -> Tensor:
    """sigma of timestep fraction ``t``: shift * t / (1 + (shift - 1) * t), t itself when shift == 1."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def sai_schedule(steps: int, shift: float, train_steps: int = 1000, sgm: bool = False) -> Tensor:
    """``SD3Inferencer.get_sigmas``: the float32 table sigma(t/1000) for t = 1..1000, its ends times 1000 spanned
    by ``torch.linspace`` in float32, each point shifted again (no formula when shift == 1), then 0 (QUIRKS S3).
    ComfyUI's ``normal`` scheduler computes the same; ``sgm``: its ``sgm_uniform``, steps + 1 points of which the
    last is dropped."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table = _flow_sigma(torch.arange(1, train_steps + 1, 1) / 1000.0, shift)
    timesteps = torch.linspace(table[-1] * 1000, table[0] * 1000, steps + 1 if sgm else steps)
    timesteps = timesteps[:-1] if sgm else timesteps
    return torch.tensor([float(_flow_sigma(ts / 1000.0, shift)) for ts in timesteps] + [0.0], dtype=torch.float32)


def simple_schedule(steps: int, shift: float, train_steps: int = 1000) -> Tensor:
    """ComfyUI's ``simple`` scheduler: entries of its table sigma(((t / 1000) * 1000) / 1000), t = 1..1000 in
    float32, taken from the end every ``1000 / steps`` (int of the float product), then 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table = _flow_sigma((torch.arange(1, train_steps + 1, 1) / train_steps) * 1000 / 1000, shift)
    every = len(table) / steps
    return torch.tensor([float(table[-(1 + int(x * every))]) for x in range(steps)] + [0.0], dtype=torch.float32)


def sai_start_index(steps: int, denoise: float) -> int:
    """img2img: the reference keeps ``sigmas[int(steps * (1 - denoise)):]`` (1 - 0.8 = 0.19999.. -> 7 of 40)."""
    return int(steps * (1 - denoise))


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


# ---------------------------------------------------------------------------------------------- the loop

@dataclass(frozen=True, kw_only=True)
class Form:
    """How the loop computes, one field per quirk, each independent of the others. The defaults are diffusers'
    ``StableDiffusion3Pipeline``."""
    schedule: str = "linspace_f64"  # S3: numpy float64 linspace (diffusers) or "linspace_f32": torch float32;
    #                                 "sgm_uniform" and "simple": two of ComfyUI's schedulers
    update: str = "euler_velocity"  # S1/S6: x + dt * v, "euler_x0" (k-diffusion: d = (x - x0) / sigma) or "dpmpp_2m"
    cfg_batch: str = "uncond_first"  # G2: the order of the CFG batch, "uncond_first" or "cond_first"
    cfg_space: str = "velocity"  # G2: guide the model output in its dtype, or "x0" = x - v * sigma in float32
    cfg_always: bool = False  # G3: run the two-branch batch even at guidance <= 1
    cfg_skip: str = "at_most_one"  # G3: without cfg_always, no uncond branch at guidance <= 1; "one" (ComfyUI):
    #                                only at guidance 1 (math.isclose)
    timestep_dtype: torch.dtype = torch.float32  # S4: sigma in this dtype gives the timestep and the x0 sigma
    latent_dtype: torch.dtype | None = None  # S5: None: the model dtype after every step; else the start
    #                                          latent's dtype, then whatever the update promotes it to
    cond_dtype: torch.dtype | None = None  # sd3_infer.fix_cond: context and pooled rounded through float16
    slg_scale: float = 2.8  # G5: the skip-layer guidance scale (2.5 in the SD3.5 code); added in cfg_space
    slg_window: str = "steps"  # G5: steps * start < k < steps * stop (k from the first step run); "sigma"
    #                            (ComfyUI): shifted(1 - stop) <= sigma <= shifted(1 - start), in double precision
    noise: str = "model_dtype"  # N1: one generator, randn in the model dtype, the img2img posterior drawn first;
    #                             "fp32_to_fp16": a float32 randn cast to float16, the posterior from seed + 1
    cfg_lengths: str = "concat"  # G6: cond and uncond contexts of other lengths are concatenated as they are (an
    #                              error); "split" (ComfyUI): then they run as two batch-1 calls, cond first
    img2img: str = "scale_noise"  # S7: t_start = int(N - N * strength), sigma in the latent dtype, channels-last
    #                               image; "noise_scaling": sigmas[int(N * (1 - strength)):], float32 sigma, contiguous;
    #                               "mean" (ComfyUI): the posterior mean (no draw), the last N of int(N / strength)


_CHOICES = {"schedule": ("linspace_f64", "linspace_f32", "sgm_uniform", "simple"), "update": ("euler_velocity", "euler_x0", "dpmpp_2m"),
            "cfg_batch": ("uncond_first", "cond_first"), "cfg_space": ("velocity", "x0"),
            "noise": ("model_dtype", "fp32_to_fp16"), "img2img": ("scale_noise", "noise_scaling", "mean"),
            "cfg_lengths": ("concat", "split"), "slg_window": ("steps", "sigma"), "cfg_skip": ("at_most_one", "one")}


@dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    steps: int = 28
    shift: float = 3.0
    guidance: float = 7.0
    dtype: torch.dtype = torch.float32  # the model dtype: every model input is cast to it
    slg_layers: tuple[int, ...] = ()  # skip-layer guidance (off unless layers are given)
    slg_scale: float | None = None  # None: the form's default (G5)
    slg_start: float = 0.01  # the skip-layer window's ends, as the form's slg_window reads them
    slg_stop: float = 0.2
    negative_zero: float | None = None  # ComfyUI's zeroed negative: from this fraction of the schedule on the
    #                                     negative is zeros (ConditioningZeroOut); 0: at every step (``negative_at``)
    form: Form = Form()

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.negative_zero is not None and not 0 <= self.negative_zero < 1:
            raise ValueError(f"negative_zero {self.negative_zero}: expected a fraction in [0, 1)")
        for name, choices in _CHOICES.items():
            if getattr(self.form, name) not in choices:
                raise ValueError(f"sampler form {name}={getattr(self.form, name)!r}: expected one of {choices}")


def sigmas(s: SamplerSettings) -> Tensor:
    """The (steps + 1,) float32 sigmas, ending in 0, of the form's schedule (S3)."""
    if s.form.schedule == "linspace_f64":
        return diffusers_schedule(s.steps, s.shift)[0]
    if s.form.schedule == "simple":
        return simple_schedule(s.steps, s.shift)
    return sai_schedule(s.steps, s.shift, sgm=s.form.schedule == "sgm_uniform")


def img2img_plan(s: SamplerSettings, strength: float) -> tuple[SamplerSettings, int]:
    """img2img: the settings whose schedule the loop runs and the first index of it run (S7). ``mean``
    (ComfyUI's ``KSampler.set_steps``): a schedule of int(N / strength) steps, of which the last N run."""
    if s.form.img2img != "mean":
        return s, start_index(s, strength)
    longer = replace(s, steps=int(s.steps / strength))
    return longer, longer.steps - s.steps


def start_index(s: SamplerSettings, strength: float) -> int:
    """img2img: the first schedule index run (S7)."""
    if s.form.img2img == "mean":
        raise ValueError("img2img 'mean' runs a longer schedule: img2img_plan gives its settings and start")
    f = diffusers_start_index if s.form.img2img == "scale_noise" else sai_start_index
    start = f(s.steps, strength)
    if start >= s.steps:
        raise ValueError(f"strength {strength} leaves no denoising step out of {s.steps}")
    return start


def draws(s: SamplerSettings, seed: int, shape: tuple[int, ...], posterior: tuple[int, ...] | None = None
          ) -> tuple[Tensor, Tensor | None]:
    """(noise, img2img posterior noise) from ``seed`` (N1). ``model_dtype`` (diffusers): one CPU generator,
    ``randn`` in the model dtype, the posterior drawn first (``prepare_latents``). ``fp32_to_fp16`` (the SD3.5
    code's ``get_noise``): a float32 ``randn`` from ``torch.manual_seed(seed)`` cast to the float16 latent; the
    code's posterior is an unseeded ``randn_like``, drawn here in float32 from ``seed + 1`` (what the harness
    seeds the code with)."""
    g = torch.Generator("cpu").manual_seed(seed)
    if s.form.noise == "model_dtype":
        first = None if posterior is None else torch.randn(posterior, dtype=s.dtype, generator=g)
        return torch.randn(shape, dtype=s.dtype, generator=g), first
    noise = torch.randn(shape, dtype=torch.float32, generator=g).to(torch.float16)
    if posterior is None:
        return noise, None
    return noise, torch.randn(posterior, generator=torch.Generator("cpu").manual_seed(seed + 1))


def start_latent(s: SamplerSettings, noise: Tensor, base: Tensor | None, start: int = 0) -> Tensor:
    """The latent the loop starts from, in the start dtype (S5). txt2img (``base`` None): the noise; the
    ``fp32_to_fp16`` form mixes it with an empty latent (0.0609) at sigma 1, which leaves the noise. img2img:
    sigma * noise + (1 - sigma) * base at the start index, with sigma cast to the latent dtype (diffusers'
    ``scale_noise``) or in float32 (the reference's ``noise_scaling``) (S7)."""
    dtype = s.form.latent_dtype or s.dtype
    if base is None:
        if s.form.noise == "model_dtype":
            return noise.to(dtype)
        base = torch.ones(noise.shape) * 0.0609
    sigma = sigmas(s)[start]
    if s.form.img2img == "scale_noise":
        sigma = sigma.to(dtype)
    return sigma * noise.to(dtype) + (1.0 - sigma) * base.to(dtype)


@dataclass
class Conditioning:
    context: Tensor  # (1, L, joint)
    pooled: Tensor  # (1, P)


Model = Callable[..., Tensor]  # (x, t, y, context, skip_layers=()) -> velocity


def denoise(model: Model, latent: Tensor, cond: Conditioning, uncond: Conditioning, s: SamplerSettings,
            start: int = 0, on_step: Callable[[int, dict], None] | None = None) -> Tensor:
    """The denoising loop from schedule index ``start`` on ``latent`` (``start_latent``); returns the last latent.
    With ``Form()`` it is diffusers' pipeline loop, with the SD3.5 code's values its ``do_sampling`` (its samplers
    and ``CFGDenoiser`` / ``SkipLayerCFGDenoiser``). ``on_step(i, d)`` sees step ``i``'s sigma, timestep,
    model output, guided output (``velocity`` or ``x0``, by the CFG space) and new latent."""
    x, old = latent, None
    for i in range(start, s.steps):
        d = step(model, x, i, start, old, cond, uncond, s)
        x, old = d["latent"], d["old"]
        if on_step is not None:
            on_step(i, d)
    return x


def step(model: Model, x: Tensor, i: int, start: int, old: Tensor | None, cond: Conditioning,
         uncond: Conditioning, s: SamplerSettings) -> dict:
    """Denoising step ``i`` of a loop that began at ``start`` (the skip-layer window counts from it), on the latent
    ``x``; ``old``: the previous step's x0 (DPM-Solver++(2M)'s second order), None at the first step. Returns the
    step's sigma, timestep, model output, guided output (under the CFG space's name), new latent, and the x0 the
    next step takes as ``old``."""
    f = s.form
    sig = sigmas(s)
    uncond = negative_at(s, sig[i], uncond)
    if f.cond_dtype is not None:
        cond, uncond = (Conditioning(c.context.to(f.cond_dtype), c.pooled.to(f.cond_dtype)) for c in (cond, uncond))
    cfg = f.cfg_always or (s.guidance > 1 if f.cfg_skip == "at_most_one" else not math.isclose(s.guidance, 1.0))
    unequal = cond.context.shape[1] != uncond.context.shape[1]
    if cfg and unequal and f.cfg_lengths == "concat":
        raise ValueError(f"the prompt's context has {cond.context.shape[1]} rows and the negative's "
                         f"{uncond.context.shape[1]}: one CFG batch cannot hold both (cfg_lengths=split runs them "
                         "as two calls, as ComfyUI does)")
    split = cfg and unequal
    pair = (uncond, cond) if f.cfg_batch == "uncond_first" else (cond, uncond)
    context = torch.cat([c.context for c in pair]) if cfg and not split else cond.context
    pooled = torch.cat([c.pooled for c in pair]) if cfg and not split else cond.pooled
    scale = s.slg_scale if s.slg_scale is not None else f.slg_scale
    sigma_t = sig[i].to(f.timestep_dtype)  # S4: the reference's sigma * s_in in the start latent's dtype
    timestep = (sigma_t * 1000).float()

    def call(x_in, y, c, skip=()):
        kwargs = {"skip_layers": skip} if skip else {}
        out = model(x_in.to(s.dtype), timestep.expand(x_in.shape[0]), y.to(s.dtype), c.to(s.dtype), **kwargs)
        return out if f.cfg_space == "velocity" else x_in - out.float() * sigma_t

    if split:  # ComfyUI: the cond call, then the uncond call, each alone
        parts = {"cond": call(x, cond.pooled, cond.context), "uncond": call(x, uncond.pooled, uncond.context)}
        out = torch.cat([parts["uncond"], parts["cond"]] if f.cfg_batch == "uncond_first" else
                        [parts["cond"], parts["uncond"]])
    else:
        out = call(torch.cat([x, x]) if cfg else x, pooled, context)
    guided = out
    if cfg:
        first, second = out.chunk(2)
        pos, neg = (second, first) if f.cfg_batch == "uncond_first" else (first, second)
        guided = guide(neg, pos, s.guidance)
        if s.slg_layers and slg_active(s, sig[i], i - start):
            guided = guided + (pos - call(x, cond.pooled, cond.context, s.slg_layers)) * scale
    new, x0 = _update(f.update, f.cfg_space, x, guided, sig, i, sigma_t, old)
    if f.latent_dtype is None:
        new = new.to(s.dtype)
    return {"sigma": sig[i], "timestep": timestep, "model_output": out, f.cfg_space: guided, "latent": new, "old": x0}


def percent_sigma(shift: float, p: float) -> float:
    """The sigma a fraction ``p`` of the way through a shifted flow schedule (ComfyUI's ``percent_to_sigma``), in
    double precision."""
    t = 1.0 - p
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def slg_active(s: SamplerSettings, sigma: Tensor, k: int) -> bool:
    """Whether step ``k`` (counted from the first step run) at ``sigma`` adds the skip-layer term (G5)."""
    if s.form.slg_window == "sigma":  # ComfyUI's percent_to_sigma bounds, compared with the float32 sigma's value
        return percent_sigma(s.shift, s.slg_stop) <= float(sigma) <= percent_sigma(s.shift, s.slg_start)
    return s.steps * s.slg_start < k < s.steps * s.slg_stop


def negative_at(s: SamplerSettings, sigma: Tensor, uncond: Conditioning) -> Conditioning:
    """The negative a step at ``sigma`` sees. With ``negative_zero`` p: the negative as encoded while sigma >=
    percent_sigma(p), zeros (context and pooled) while sigma <= it, both bounds compared in float32 (a timestep
    range's bounds against the float32 sigma); p = 0: zeros at every step. At an exact tie both ranges hold, and
    ComfyUI would run both negatives: refused."""
    p = s.negative_zero
    if p is None:
        return uncond
    if p > 0:
        sig, bound = sigma.float(), torch.tensor(percent_sigma(s.shift, p), dtype=torch.float32)
        if bool(sig == bound):
            raise ValueError(f"sigma {float(sig)} is the zeroed negative's boundary ({p} of the schedule): both "
                             "negatives hold there; move the boundary")
        if bool(sig > bound):
            return uncond
    return Conditioning(torch.zeros_like(uncond.context), torch.zeros_like(uncond.pooled))


def guide(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, in the order both references write it: uncond + (cond - uncond) * scale."""
    return uncond + (cond - uncond) * scale


def to_x0(space: str, x: Tensor, guided: Tensor, sigma_t: Tensor) -> Tensor:
    """The x0 prediction of a guided output in ``space`` at the latent ``x`` (x - v * sigma for a velocity)."""
    return guided if space == "x0" else x - guided.float() * sigma_t


def _update(rule: str, space: str, x: Tensor, guided: Tensor, sig: Tensor, i: int, sigma_t: Tensor,
            old: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One step of the update rule from the guided output (converted when it is in the other space)."""
    if rule == "euler_velocity":  # diffusers' FlowMatchEulerDiscreteScheduler.step, on the velocity
        v = guided if space == "velocity" else (x - guided) / sig[i]
        return x.to(torch.float32) + (sig[i + 1] - sig[i]) * v, None
    x0 = to_x0(space, x, guided, sigma_t)
    if rule == "euler_x0":  # sd3_impls.sample_euler: d = (x - x0) / sigma
        return x + (x - x0) / sig[i] * (sig[i + 1] - sig[i]), x0
    t, t_next = -sig[i].log(), -sig[i + 1].log()  # sd3_impls.sample_dpmpp_2m, in t = -log(sigma)
    h = t_next - t
    d = x0
    if old is not None and sig[i + 1] != 0:  # the second-order correction with the previous x0
        r = (t + sig[i - 1].log()) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old
    return ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * d, x0
