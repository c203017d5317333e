"""The whole txt2img pipeline, impl against diffusers' real StableDiffusion3Pipeline on the embedded families:
text encoders, every denoising step (CFG batch [uncond, cond], skip-layer guidance), VAE decode, uint8 image."""
import numpy as np
import pytest
import torch
from conftest import sai_form

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


def test_check_command_covers_every_family_in_execution_order(monkeypatch, capsys):
    import json

    from parity.cli import main

    assert main(["check", "--json", "--prompt", "a cat", "--steps", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["seq"] for r in out["records"]] == list(range(out["n_records"]))
    image = [r for r in out["records"] if r["component"] in ("mmdit", "sampler", "vae")]
    assert {r["model"] for r in image} == {f"embedded-{f}" for f in embedded.MMDIT}
    for family, c in embedded.MMDIT.items():
        mine = [r for r in image if r["model"] == f"embedded-{family}"]
        steps = [r["step"] for r in mine if r["step"] is not None]
        assert steps == sorted(steps)  # no record of step s + 1 before a record of step s
        mmdit = [r for r in mine if r["component"] == "mmdit" and not r["layer"].startswith("weight:")]
        assert {(r["step"], r["branch"]) for r in mmdit} == {(s, b) for s in (0, 1) for b in ("uncond", "cond")}
        assert {r["block"] for r in mmdit} == set(range(c.depth)) | {None}
        assert {r["stream"] for r in mmdit} == {"image", "context", None}
        layers = [(r["step"], r["branch"], r["layer"]) for r in mine]
        assert layers.index((0, "cond", "output")) < layers.index((0, None, "velocity")) < \
            layers.index((0, None, "latent")) < layers.index((1, "uncond", "input.latent_in"))
    assert {r["layer"] for r in image if r["component"] == "vae"} >= {"decoder.mid.attn_1", "image_uint8"}
    assert all(r["bitwise_equal"] for r in out["records"])


def test_injected_weight_change_is_located(monkeypatch, capsys):
    """One ulp in one weight of block 1's context MLP, as impl loads it: reported as that parameter, before any
    activation; the first activation it moves is that MLP at step 0."""
    import json

    from parity.cli import main
    from parity.sides import impl as side

    load = side.load_image_parts

    def nudged(*args):
        mmdit, vae, quantized = load(*args)
        with torch.no_grad():
            mmdit.joint_blocks[1].context_block.mlp.fc2.weight.view(torch.int32)[0, 0] += 1
        return mmdit, vae, quantized
    monkeypatch.setattr(side, "load_image_parts", nudged)
    assert main(["check", "--json", "--prompt", "a cat", "--family", "sd3.5-large"]) == 1
    out = json.loads(capsys.readouterr().out)
    fd = out["first_divergence"]
    assert {k: v for k, v in fd.items() if k != "seq"} == {
        "model": "embedded-sd3.5-large", "prompt": None, "component": "mmdit",
        "layer": "weight:joint_blocks.1.context_block.mlp.fc2.weight", "step": None, "branch": None, "block": None,
        "stream": None}
    first_op = next(r for r in out["records"] if not r["bitwise_equal"] and not r["layer"].startswith("weight:"))
    # in the branch whose products the ulp reaches first: uncond on an Intel Xeon, cond on an AMD EPYC (Zen 4)
    assert (first_op["layer"], first_op["step"]) == ("block.1.context.mlp.fc2", 0)


def test_damaged_cache_is_refused(tmp_path, monkeypatch, capsys):
    """The embedded files are built once per content hash; impl checks what it reads against the manifest."""
    from safetensors.torch import load_file, save_file

    from parity.cli import main
    from parity.embedded import single_file

    monkeypatch.setenv("SD3PARITY_CACHE", str(tmp_path))
    f = single_file("sd3-medium")
    state = load_file(str(f))
    state["model.diffusion_model.final_layer.linear.bias"][0] += 1
    save_file(state, str(f))
    assert main(["check", "--prompt", "a cat", "--family", "sd3-medium"]) == 2
    assert "embedded mmdit-sd3-medium weights sha256" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_pipeline_bitwise(dtype, capsys):
    """impl mirrors diffusers' dtype handling (T5 wo kept in float32 under float16, Euler in float32 then cast,
    postprocess in the VAE dtype), so the bound in half precision is 0 ulp on every record."""
    import json

    from parity.cli import main

    assert main(["check", "--json", "--dtype", dtype, "--family", "sd3.5-medium", "--prompt", "a cat"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_records"] > 400 and out["first_divergence"] is None
    assert {r["dtype"] for r in out["records"] if r["component"] == "mmdit"} == {dtype}


def test_half_precision_runs_do_not_round_the_loaded_weights(stack):
    s = F.settings(F.profile_values("diffusers"))
    before = encode_prompt(stack, "a cat", s).context
    encode_prompt(stack, "a cat", s, torch.float16)
    encode_prompt(stack, "a cat", s, torch.bfloat16)
    assert torch.equal(encode_prompt(stack, "a cat", s).context, before)
    assert stack.encoder("t5", torch.float16).encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert torch.equal(stack.encoder("t5", torch.float16).encoder.block[0].layer[1].DenseReluDense.wo.weight,
                       stack.t5.encoder.block[0].layer[1].DenseReluDense.wo.weight)  # never rounded through fp16


@pytest.mark.parametrize("family,strength,steps", [("sd3.5-large", 0.6, 4), ("sd3-medium", 0.8, 5)])
def test_img2img_bitwise(family, strength, steps):
    """diffusers' StableDiffusion3Img2ImgPipeline: start index, posterior sample then noise from one generator,
    scale_noise at the start sigma, the remaining steps, decode."""
    from PIL import Image

    from parity.embedded import model_dir

    pixels = (np.arange(64 * 48 * 3, dtype=np.int64).reshape(64, 48, 3) * 37 % 256).astype(np.uint8)
    with pinned(1):
        pipe = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(model_dir(family))
        for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            own_storage(part)
        pipe.set_progress_bar_config(disable=True)
        ref_latents = []
        ref = pipe("a red cat", image=Image.fromarray(pixels), height=64, width=48, strength=strength,
                   num_inference_steps=steps,
                   guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3), output_type="pil",
                   callback_on_step_end=lambda p, i, t, kw: ref_latents.append(kw["latents"].clone()) or {}).images[0]
        stack = load_text_stack()
        s = F.settings(F.profile_values("diffusers"))
        cond, unc = encode_prompt(stack, "a red cat", s), encode_prompt(stack, "", s)
        model = MMDiT(embedded.MMDIT[family])
        load_strict(model, embedded.mmdit_weights(family), family)
        vae = VAE(embedded.VAE)
        load_strict(vae, embedded.vae_weights(), "vae")
        image = sampling.image_to_tensor(pixels)
        contiguous = vae.encode_moments(image.contiguous())[0]
        settings = sampling.SamplerSettings(steps=steps, guidance=5.0)
        start = sampling.start_index(settings, strength)
        mean, std = vae.encode_moments(image)
        noise, posterior = sampling.draws(settings, 3, (1, 16, 8, 6), tuple(mean.shape))
        start_latent = sampling.start_latent(settings, noise, vae.latent_in(mean + std * posterior), start)
        latents = []
        final = sampling.denoise(model, start_latent, sampling.Conditioning(cond.context, cond.pooled),
                                 sampling.Conditioning(unc.context, unc.pooled), settings, start=start,
                                 on_step=lambda i, d: latents.append(d["latent"]))
        out = sampling.to_uint8(vae.decode(vae.latent_out(final)))[0]
    assert start == sampling.diffusers_start_index(steps, strength) and len(latents) == len(ref_latents) == steps - start
    assert all(torch.equal(a, b) for a, b in zip(latents, ref_latents))
    assert torch.equal(out, torch.from_numpy(np.asarray(ref).copy()))
    assert not torch.equal(contiguous, vae.encode_moments(image)[0])  # the layout of the input image matters


def test_check_img2img_records(tmp_path, capsys):
    import json

    from PIL import Image

    from parity.cli import main

    pixels = (np.arange(64 * 64 * 3).reshape(64, 64, 3) * 37 % 256).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    assert main(["check", "--json", "--family", "sd3-medium", "--prompt", "a cat", "--image", str(tmp_path / "in.png"),
                 "--steps", "4", "--strength", "0.6"]) == 0
    out = json.loads(capsys.readouterr().out)
    image = [r for r in out["records"] if r["model"] == "embedded-sd3-medium"]
    assert {r["step"] for r in image if r["component"] == "mmdit" and r["step"] is not None} == {1, 2, 3}  # int(4 - 2.4) = 1: steps 1..3
    assert {"encoder.conv_out", "decoder.conv_out", "image_uint8"} <= {r["layer"] for r in image}
    assert out["first_divergence"] is None
    assert main(["check", "--image", str(tmp_path / "in.png"), "--size", "64x48"]) == 2
    assert "64x64 pixels; --size is 64x48" in capsys.readouterr().err


def test_generate_function_matches_the_diffusers_pipelines():
    """impl.pipeline.generate (diffusers form) is the real txt2img and img2img pipelines, bitwise; the sai form
    runs the reference's procedure (different numbers by design, deterministic per seed)."""
    from impl.pipeline import PipelineSettings, generate
    from parity.embedded import model_dir

    family = "sd3.5-medium"
    pixels = (np.arange(64 * 48 * 3, dtype=np.int64).reshape(64, 48, 3) * 37 % 256).astype(np.uint8)
    with pinned(1):
        stack = load_text_stack()
        model = MMDiT(embedded.MMDIT[family])
        load_strict(model, embedded.mmdit_weights(family), family)
        vae = VAE(embedded.VAE)
        load_strict(vae, embedded.vae_weights(), "vae")
        text = F.settings(F.profile_values("diffusers"))
        s = PipelineSettings(sampler=sampling.SamplerSettings(steps=3, guidance=5.0), seed=11, height=64, width=48)
        ours = generate(stack, model, vae, "a red cat", s, text)
        ours_i2i = generate(stack, model, vae, "a red cat", s, text, init_image=sampling.image_to_tensor(pixels))
        from PIL import Image

        kw = dict(height=64, width=48, num_inference_steps=3, guidance_scale=5.0)
        for cls, extra, got in ((diffusers.StableDiffusion3Pipeline, {}, ours),
                                (diffusers.StableDiffusion3Img2ImgPipeline,
                                 {"image": Image.fromarray(pixels), "strength": 0.6}, ours_i2i)):
            pipe = cls.from_pretrained(model_dir(family))
            for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
                own_storage(part)
            pipe.set_progress_bar_config(disable=True)
            ref = pipe("a red cat", generator=torch.Generator("cpu").manual_seed(11), **kw, **extra).images[0]
            assert torch.equal(got.image, torch.from_numpy(np.asarray(ref).copy()))
        sai = PipelineSettings(sampler=sampling.SamplerSettings(steps=3, guidance=5.0, form=sai_form()), seed=11,
                               height=64, width=48, uint8="truncate", autocast=True)
        a, b = generate(stack, model, vae, "a red cat", sai, text), generate(stack, model, vae, "a red cat", sai, text)
    assert torch.equal(a.image, b.image) and a.image.shape == (64, 48, 3) and not torch.equal(a.image, ours.image)


def test_shift_reaches_both_sides():
    """--shift 1.0 (the SD3.5 reference's SD3-Medium value, QUIRKS S2): with 2 steps the second timestep is
    sigma_min * 1000 = 1.0 unshifted on both sides (8.93 with shift 3), and the run stays bitwise."""
    from parity.run import Spec, execute, resolve

    for shift, want in ((1.0, 1.0), (3.0, 8.93)):
        run = resolve(Spec(prompts=("a cat",), families=("sd3-medium",), shift=shift))
        (impl, _), (ref, _) = execute(run, "impl"), execute(run, "diffusers")
        t = [side[k][1] for side in (impl, ref) for k in side if k.endswith("|sampler|input.timestep|1|cond")]
        assert len(t) == 2 and torch.equal(*t) and round(float(t[0]), 2) == want
        assert impl.keys() == ref.keys() and all(torch.equal(impl[k][1], ref[k][1]) for k in ref)
