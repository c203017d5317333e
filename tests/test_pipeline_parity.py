"""The whole txt2img pipeline, impl against diffusers' real StableDiffusion3Pipeline on the embedded families:
text encoders, every denoising step (CFG batch [uncond, cond], skip-layer guidance), VAE decode, uint8 image."""
import numpy as np
import pytest
import torch

from impl import embedded, sampling
from impl.mmdit import MMDiT
from impl.text import encode_prompt, load_text_stack
from impl.vae import VAE
from impl.weights import load_strict
from parity import flags as F
from parity.determinism import own_storage, pinned

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (2, 3.0), (28, 3.0), (40, 1.0), (4, 3.0), (50, 2.5)])
def test_schedule_equals_flow_match_scheduler(steps, shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    sigmas, timesteps = sampling.diffusers_schedule(steps, shift)
    assert torch.equal(sigmas, sched.sigmas) and torch.equal(timesteps, sched.timesteps)


def _run_both(model_dir, family, prompt, steps, guidance, slg=()):
    with pinned(1):
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(model_dir)
        for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            own_storage(part)
        pipe.set_progress_bar_config(disable=True)
        ref_latents = []
        kwargs = {"skip_guidance_layers": list(slg)} if slg else {}
        image = pipe(prompt, height=64, width=48, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator("cpu").manual_seed(7), output_type="pil",
                     callback_on_step_end=lambda p, i, t, kw: ref_latents.append(kw["latents"].clone()) or {},
                     **kwargs).images[0]
        stack = load_text_stack()
        s = F.settings(F.profile_values("diffusers"))
        cond, unc = encode_prompt(stack, prompt, s), encode_prompt(stack, "", s)
        model = MMDiT(embedded.MMDIT[family])
        load_strict(model, embedded.mmdit_weights(family), family)
        vae = VAE(embedded.VAE)
        load_strict(vae, embedded.vae_weights(), "vae")
        noise = torch.randn(1, 16, 8, 6, generator=torch.Generator("cpu").manual_seed(7))
        latents = []
        final = sampling.denoise(model, noise, sampling.Conditioning(cond.context, cond.pooled),
                                 sampling.Conditioning(unc.context, unc.pooled),
                                 sampling.SamplerSettings(steps=steps, guidance=guidance, slg_layers=tuple(slg)),
                                 on_step=lambda i, d: latents.append(d["latent"]))
        pixels = sampling.to_uint8(vae.decode(vae.latent_out(final)))[0]
    return latents, ref_latents, pixels, torch.from_numpy(np.asarray(image).copy())


@pytest.mark.parametrize("family", list(embedded.MMDIT))
def test_txt2img_bitwise(family):
    from parity.embedded import model_dir

    latents, ref_latents, pixels, ref_pixels = _run_both(model_dir(family), family, "a photo of a cat", 2, 5.0)
    assert len(latents) == len(ref_latents) == 2
    assert all(torch.equal(a, b) for a, b in zip(latents, ref_latents))
    assert pixels.shape == ref_pixels.shape == (64, 48, 3) and torch.equal(pixels, ref_pixels)


def test_skip_layer_guidance_and_no_cfg():
    """diffusers' SLG window is 0.01*N < i < 0.2*N on the loop index: step 1 of 6 gets the third forward."""
    from parity.embedded import model_dir

    d = model_dir("sd3.5-medium")
    latents, ref_latents, _, _ = _run_both(d, "sd3.5-medium", "wow!!", 6, 4.0, slg=(1,))
    assert all(torch.equal(a, b) for a, b in zip(latents, ref_latents)) and len(latents) == 6
    plain, _, _, _ = _run_both(d, "sd3.5-medium", "wow!!", 6, 4.0)
    assert torch.equal(plain[0], latents[0]) and not torch.equal(plain[1], latents[1])  # SLG acts at step 1 only
    latents, ref_latents, _, _ = _run_both(d, "sd3.5-medium", "wow!!", 2, 1.0)  # guidance <= 1: no CFG batch (G3)
    assert all(torch.equal(a, b) for a, b in zip(latents, ref_latents))
