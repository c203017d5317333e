"""Sampler forms of both references, checked against the measured facts of QUIRKS.md (S1-S7, G2, G3, V3)."""
from dataclasses import replace

import pytest
import torch
from conftest import sai_form

from impl import sampling as S

diffusers = pytest.importorskip("diffusers")


class Recorder:
    """A stand-in transformer: records its inputs, returns a velocity that depends on them."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y, context, skip_layers=()):
        self.calls.append({"x": x, "t": t, "y": y, "context": context, "skip": tuple(skip_layers)})
        v = 0.1 * x + 0.001 * t.float().view(-1, 1, 1, 1) + context.float().mean((1, 2)).view(-1, 1, 1, 1)
        return (v + 0.5 * len(skip_layers)).to(x.dtype)  # skipping layers changes the output


def _conds():
    return S.Conditioning(torch.ones(1, 3, 4), torch.ones(1, 2)), S.Conditioning(torch.zeros(1, 3, 4), torch.zeros(1, 2))


@pytest.mark.parametrize("steps", [4, 28, 40])
def test_s3_schedules_differ_by_at_most_one_ulp_of_one(steps):
    sai, dif = S.sai_schedule(steps, 3.0), S.diffusers_schedule(steps, 3.0)[0]
    assert sai.shape == dif.shape == (steps + 1,)
    assert 0 < (sai - dif).abs().max() <= 1.2e-7
    assert round(float(sai[-2]), 6) == 0.008929 and sai[-1] == 0  # the double shift of sigma_min


def _sai(**form):
    return replace(sai_form(), **form)


def test_s4_s5_fp16_timesteps_and_latent_dtype():
    model, (cond, unc) = Recorder(), _conds()
    latents = []
    s = S.SamplerSettings(steps=28, form=_sai(update="euler_x0"))
    S.denoise(model, S.start_latent(s, torch.zeros(1, 16, 2, 2), None), cond, unc, s,
              on_step=lambda i, d: latents.append(d["latent"].dtype))
    t_sai = torch.stack([c["t"][0] for c in model.calls])
    t_dif = S.diffusers_schedule(28, 3.0)[1]
    assert float(t_dif[1]) == pytest.approx(987.3806) and float(t_sai[1]) == 987.5  # QUIRKS S4's example
    assert 0.4 < (t_sai - t_dif).abs().max() < 0.5  # fp16 sigma (spacing 2**-11) times 1000, rounded in fp16
    assert model.calls[0]["x"].dtype == torch.float32  # cast to the model dtype for the call
    assert latents[0] == torch.float32  # fp16 latent + fp32 update = fp32 from the first step on (S5)
    model32, dif = Recorder(), Recorder()
    s32 = S.SamplerSettings(steps=28, form=_sai(timestep_dtype=torch.float32))  # the flag alone
    S.denoise(model32, torch.zeros(1, 16, 2, 2), cond, unc, s32)
    assert torch.equal(torch.stack([c["t"][0] for c in model32.calls]), S.sai_schedule(28, 3.0)[:-1] * 1000)
    S.denoise(dif, torch.zeros(1, 16, 2, 2), cond, unc, S.SamplerSettings(steps=28, form=S.Form(
        timestep_dtype=torch.float16)))
    assert float(dif.calls[1]["t"][0]) == 987.5  # the diffusers form with fp16 timesteps only


def test_s5_latent_dtype_alone():
    """diffusers keeps the latent in the model dtype; latent_dtype=float16 starts in fp16, then the update
    promotes it to float32 (bfloat16 model: the latent stays float32)."""
    cond, unc = _conds()
    for form, want in ((S.Form(), torch.bfloat16), (S.Form(latent_dtype=torch.float16), torch.float32)):
        s, seen = S.SamplerSettings(steps=3, dtype=torch.bfloat16, form=form), []
        start = S.start_latent(s, torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0)), None)
        S.denoise(Recorder(), start, cond, unc, s, on_step=lambda i, d: seen.append(d["latent"].dtype))
        assert start.dtype == (form.latent_dtype or torch.bfloat16) and set(seen) == {want}


def test_g2_g3_batch_order_and_cfg_at_guidance_one():
    cond, unc = _conds()
    sai, dif = Recorder(), Recorder()
    S.denoise(sai, torch.zeros(1, 16, 2, 2), cond, unc, S.SamplerSettings(steps=2, guidance=1.0, form=sai_form()))
    S.denoise(dif, torch.zeros(1, 16, 2, 2), cond, unc, S.SamplerSettings(steps=2, guidance=1.0))
    assert sai.calls[0]["context"].shape[0] == 2 and sai.calls[0]["context"][0].mean() == 1  # [cond, uncond]
    assert dif.calls[0]["context"].shape[0] == 1  # guidance <= 1: no CFG batch
    dif2, cond_first, always = Recorder(), Recorder(), Recorder()
    S.denoise(dif2, torch.zeros(1, 16, 2, 2), cond, unc, S.SamplerSettings(steps=2, guidance=5.0))
    assert dif2.calls[0]["context"][0].mean() == 0  # [uncond, cond]
    S.denoise(cond_first, torch.zeros(1, 16, 2, 2), cond, unc,
              S.SamplerSettings(steps=2, guidance=5.0, form=S.Form(cfg_batch="cond_first")))
    assert cond_first.calls[0]["context"][0].mean() == 1  # the batch order alone
    S.denoise(always, torch.zeros(1, 16, 2, 2), cond, unc,
              S.SamplerSettings(steps=2, guidance=1.0, form=S.Form(cfg_always=True)))
    assert always.calls[0]["context"].shape[0] == 2  # G3 alone


def test_g2_cfg_space_alone():
    """The same model outputs guided on the velocity (model dtype) or on x0 (float32): equal up to rounding."""
    cond, unc = _conds()
    noise = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    out = {}
    for space in ("velocity", "x0"):
        steps = []
        S.denoise(Recorder(), noise, cond, unc, S.SamplerSettings(steps=3, guidance=5.0, form=S.Form(cfg_space=space)),
                  on_step=lambda i, d: steps.append(d))
        assert space in steps[0]
        out[space] = steps[-1]["latent"]
    assert torch.allclose(out["velocity"], out["x0"], atol=1e-5) and not torch.equal(out["velocity"], out["x0"])


def test_s1_dpmpp_2m_first_step_is_euler_and_last_step_returns_x0():
    cond, unc = _conds()
    noise = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    euler, dpm = [], []
    S.denoise(Recorder(), noise, cond, unc, S.SamplerSettings(steps=3, form=_sai(update="euler_x0",
              latent_dtype=torch.float32)), on_step=lambda i, d: euler.append(d))
    S.denoise(Recorder(), noise, cond, unc, S.SamplerSettings(steps=3, form=_sai(latent_dtype=torch.float32)),
              on_step=lambda i, d: dpm.append(d))
    assert torch.allclose(euler[0]["latent"], dpm[0]["latent"], atol=1e-6)
    assert not torch.allclose(euler[1]["latent"], dpm[1]["latent"], atol=1e-4)  # the 2M correction acts
    assert torch.equal(dpm[-1]["latent"], dpm[-1]["x0"])  # sigma_next = 0: x = x0 exactly


def test_n1_noise_forms():
    """diffusers: randn in the model dtype from the seeded generator, the img2img posterior drawn first; sai: the
    float32 draw cast to float16, the posterior from seed + 1."""
    dif, sai = S.SamplerSettings(), S.SamplerSettings(form=sai_form())
    n, p = S.draws(dif, 5, (1, 16, 2, 2), (1, 16, 2, 2))
    g = torch.Generator().manual_seed(5)
    first = torch.randn(1, 16, 2, 2, generator=g)
    assert torch.equal(p, first) and torch.equal(n, torch.randn(1, 16, 2, 2, generator=g))
    n16, p16 = S.draws(sai, 5, (1, 16, 2, 2), (1, 16, 2, 2))
    assert n16.dtype == torch.float16 and torch.equal(n16, first.half())
    assert torch.equal(p16, torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(6)))
    assert torch.equal(S.start_latent(sai, n16, None), n16)  # sigma 1 leaves the noise (get_empty_latent mix)


def test_s7_img2img_start_index():
    assert S.sai_start_index(40, 0.8) == 7  # 1 - 0.8 = 0.19999999999999996
    assert int(40 - min(40 * 0.8, 40)) == 8  # diffusers' t_start for strength 0.8
    assert S.start_index(S.SamplerSettings(steps=40), 0.8) == 8
    assert S.start_index(S.SamplerSettings(steps=40, form=S.Form(img2img="noise_scaling")), 0.8) == 7
    with pytest.raises(ValueError, match="no denoising step"):
        S.start_index(S.SamplerSettings(steps=4), 0.0)


def test_v3_truncation_vs_rounding():
    image = torch.tensor([0.9976, -1.0, 0.0, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert S.sai_to_uint8(image)[0, 0, :, 0].tolist() == [254, 0, 127, 255]
    assert S.to_uint8(image)[0, 0, :, 0].tolist() == [255, 0, 128, 255]
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    diff = S.to_uint8(noise).int() - S.sai_to_uint8(noise).int()
    assert set(diff.unique().tolist()) == {0, 1} and 0.4 < (diff == 1).float().mean() < 0.6


def test_sai_euler_close_to_diffusers_on_the_tiny_model():
    """Same model and noise, float32, guidance 1: x0-form Euler on the [cond, uncond] batch vs velocity Euler on
    the cond batch differ by rounding only (S6, G2, G3)."""
    from impl import embedded
    from impl.mmdit import MMDiT
    from impl.weights import load_strict

    model = MMDiT(embedded.MMDIT["sd3-medium"])
    load_strict(model, embedded.mmdit_weights("sd3-medium"), "tiny")
    g = torch.Generator().manual_seed(1)
    cond = S.Conditioning(torch.randn(1, 10, 96, generator=g), torch.randn(1, 80, generator=g))
    unc = S.Conditioning(torch.randn(1, 10, 96, generator=g), torch.randn(1, 80, generator=g))
    noise = torch.randn(1, 16, 4, 4, generator=g)
    with torch.no_grad():
        a = S.denoise(model, noise, cond, unc, S.SamplerSettings(steps=4, guidance=1.0, form=_sai(
            update="euler_x0", latent_dtype=torch.float32, timestep_dtype=torch.float32, cond_dtype=None)))
        b = S.denoise(model, noise, cond, unc, S.SamplerSettings(steps=4, guidance=1.0))
    assert 0 < (a - b).abs().max() < 1e-4


def test_g5_skip_layer_guidance_windows():
    """SD3.5 reference: the window is on the denoiser call count (0.01*N < k < 0.2*N), the third forward runs on
    cond only with the skip layers, and (cond - skip) * scale is added to the CFG'd x0. diffusers: the same window
    on the loop index, in velocity space."""
    cond, unc = _conds()
    sai = Recorder()
    S.denoise(sai, torch.zeros(1, 16, 2, 2), cond, unc, S.SamplerSettings(steps=10, slg_layers=(7, 8, 9), form=sai_form()))
    skipped = [k for k, c in enumerate(sai.calls) if c["skip"]]
    assert [c["x"].shape[0] for c in sai.calls[:4]] == [2, 2, 1, 2] and skipped == [2]  # step 1 only: 0.1 < 1 < 2
    assert sai.calls[2]["skip"] == (7, 8, 9) and sai.calls[2]["context"].mean() == 1  # cond
    plain, guided = [], []
    S.denoise(Recorder(), torch.zeros(1, 16, 2, 2), cond, unc, S.SamplerSettings(steps=10, form=sai_form()),
              on_step=lambda i, d: plain.append(d["x0"]))
    S.denoise(Recorder(), torch.zeros(1, 16, 2, 2), cond, unc, S.SamplerSettings(steps=10, slg_layers=(1,), form=sai_form()),
              on_step=lambda i, d: guided.append(d["x0"]))
    assert torch.equal(plain[0], guided[0]) and not torch.equal(plain[1], guided[1])
