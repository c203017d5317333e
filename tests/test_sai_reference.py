"""The sai profile's image side against the SD3.5 reference code, and the harness mechanics around that code.

The reference is not a package: the tests that run it need ``$SD3PARITY_SAI_CODE`` naming a local checkout of
Stability-AI/sd3.5 and are skipped without one (CI has none). The rest run everywhere.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch

from impl import sampling as S
from parity import sai_reference as SR
from parity.cli import main

CODE = os.environ.get(SR.ENV)
needs_code = pytest.mark.skipif(not CODE, reason=f"set {SR.ENV} to a local checkout of Stability-AI/sd3.5")


def _check(capsys, *args):
    rc = main(["check", "--json", "--profile", "sai", "--prompt", "a cat", *args])
    return rc, json.loads(capsys.readouterr().out)


@needs_code
@pytest.mark.parametrize("extra", [
    [],  # DPM-Solver++(2M), float32, all three families
    ["--dtype", "float16"],
    ["--dtype", "bfloat16", "--flag", "sampler=sai_euler", "--family", "sd3.5-large"],
    ["--family", "sd3.5-medium", "--slg", "1", "--steps", "6", "--size", "48x64"],  # skip-layer calls at steps 1-2
])
def test_sai_profile_is_bitwise_equal_to_the_reference_code(extra, capsys):
    rc, out = _check(capsys, *extra)
    assert rc == 0 and out["first_divergence"] is None
    components = {r["component"] for r in out["records"]}
    assert {"mmdit", "sampler", "vae"} <= components and not out["n_failed"]


@needs_code
def test_sai_img2img_is_bitwise_equal_to_the_reference_code(tmp_path, capsys):
    from PIL import Image

    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    rc, out = _check(capsys, "--family", "sd3.5-large", "--image", str(tmp_path / "in.png"), "--steps", "4")
    assert rc == 0 and out["first_divergence"] is None
    assert any(r["layer"].startswith("encoder.") for r in out["records"])
    assert min(r["step"] for r in out["records"] if r["component"] == "sampler") == 1  # int(4 * (1 - 0.6))


@needs_code
@pytest.mark.parametrize("flag, extra, first", [
    ("attention_order=image_first", [], ("mmdit", "block.0.x.attn.proj")),  # M3
    ("qk_norm_form=upcast", ["--dtype", "bfloat16"], ("mmdit", "block.0.x.attn.ln_q")),  # M6
    ("uint8=round", [], ("vae", "image_uint8")),  # V3
    ("vae_attention=linear", ["--dtype", "float16"], ("vae", "decoder.mid.attn_1")),  # V1b
    # each sampler quirk alone, back to its diffusers value: the reference code computes the sai one
    ("schedule=diffusers", ["--steps", "4"], ("sampler", "input.latent_in")),  # S3
    ("cfg_space=velocity", [], ("sampler", "input.latent_in")),  # G2
    ("cfg_always=false", ["--guidance", "1"], ("mmdit", "block.0.x.attn.proj")),  # G3: batch 1, no uncond
    ("timestep_dtype=float32", [], ("sampler", "input.timestep")),  # S4
    ("latent_dtype=model", [], ("sampler", "input.latent_in")),  # S5: the fp32 start latent
    ("cond_dtype=model", [], ("sampler", "input.context")),  # fix_cond
    ("noise=diffusers", ["--dtype", "bfloat16"], ("sampler", "input.latent_in")),  # N1: bf16 noise, then fp16
    ("slg=diffusers", ["--slg", "1", "--steps", "6"], ("sampler", "input.latent_in")),  # G5: scale 2.8
    ("shift=scheduler_config", ["--family", "sd3-medium"], ("sampler", "input.latent_in")),  # S2
    ("autocast=off", [], ("mmdit", "patch_embed")),  # N2: the reference's convolution runs in float16
    ("autocast=off", ["--dtype", "float16"], ("mmdit", "block.0.x.attn.q")),  # N2: its LayerNorm in float32
    ("casts=diffusers", [], ("mmdit", "tokens")),  # N3: float16 patches + float32 pos_embed stay float32
])
def test_sai_flag_flips_against_the_reference_code(flag, extra, first, capsys):
    family = [] if "--family" in extra else ["--family", "sd3.5-medium"]
    rc, out = _check(capsys, *family, "--flag", flag, *extra)
    fd = out["first_divergence"]
    assert rc == 1 and (fd["component"], fd["layer"]) == first


def test_sai_profile_without_the_code_says_so(capsys, monkeypatch):
    monkeypatch.delenv(SR.ENV, raising=False)
    rc, out = _check(capsys, "--text-only")
    assert rc == 0
    rc, out = _check(capsys)
    assert rc == 0 and any("--sai-code" in n for n in out["notes"])
    assert {r["component"] for r in out["records"]} <= {"clip-l", "clip-g", "t5", "conditioning"}


def test_sai_code_dir_must_be_a_checkout(tmp_path, capsys):
    (tmp_path / "sd3_infer.py").write_text("")
    assert main(["check", "--profile", "sai", "--sai-code", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "sd3_impls.py" in err and "mmditx.py" in err


def test_import_stubs_fire_and_restores_modules(tmp_path):
    """sd3_infer.py ends with ``fire.Fire(main)``: importing it must not run main; afterwards sys.path and
    sys.modules are as before (a stand-in checkout, not the reference's code)."""
    for name in SR.FILES:
        (tmp_path / name).write_text("")
    (tmp_path / "sd3_infer.py").write_text("import fire\nimport sd3_impls\n\ndef main():\n    raise SystemExit(3)\n\n"
                                           "fire.Fire(main)\nLOADED = True\n")
    path, mods = list(sys.path), dict(sys.modules)
    with SR.imported(tmp_path) as ref:
        assert ref.infer.LOADED and ref.impls.__file__.startswith(str(tmp_path))
    assert sys.path == path and "sd3_infer" not in sys.modules and sys.modules.get("fire") is mods.get("fire")


def test_hooks_pair_each_step_with_the_latent_after_it():
    class FakeRef:
        impls = type("impls", (), {"sample_euler": None, "sample_dpmpp_2m": None})

    h = SR.Hooks(FakeRef())
    h.steps = [{"latent_before": torch.tensor(float(i)), "x0": torch.tensor(10.0 + i)} for i in range(3)]
    h.final = torch.tensor(3.0)
    assert [(float(s["x0"]), float(s["latent"])) for s in h.per_step()] == [(10, 1), (11, 2), (12, 3)]


def test_fix_cond_rounds_the_conditioning_to_float16():
    """sd3_infer.fix_cond: ``.half()`` on context and pooled whatever the model dtype (float32 here)."""
    seen = []

    def model(x, t, y, context, skip_layers=()):
        seen.append((y, context))
        return torch.zeros(x.shape, dtype=x.dtype)

    g = torch.Generator().manual_seed(0)
    c = S.Conditioning(torch.randn(1, 3, 8, generator=g), torch.randn(1, 4, generator=g))
    S.denoise(model, torch.zeros(1, 16, 2, 2), c, c, S.SamplerSettings(steps=1, form=S.SAI))
    y, context = seen[0]
    assert y.dtype == context.dtype == torch.float32
    assert torch.equal(context[:1], c.context.half().float()) and not torch.equal(context[:1], c.context)


def test_sai_image_preprocessing_is_contiguous():
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    t = S.sai_image_to_tensor(pixels)
    assert t.shape == (1, 3, 4, 4) and t.is_contiguous()
    assert torch.equal(t, 2.0 * torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None] - 1.0)


def test_native_qk_norm_runs_on_the_per_token_view():
    """The reference normalises (B, L, H, E); impl's native form gets (B, H, L, E) and must compute on the
    per-token view of the same memory to give the same half-precision bits."""
    from impl.math import RMSNorm
    from impl.mmdit import QKNorm

    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(2, 154, 3 * 3 * 64, generator=g) * 3).half()
    w = torch.randn(64, generator=g)
    per_token = qkv.reshape(2, 154, 3, 3, 64).movedim(2, 0)[0]  # the reference's q: (B, L, H, E)
    plain, qk = RMSNorm(64, 1e-6, "native"), QKNorm(64, 1e-6, "native")
    plain.weight.data, qk.weight.data = w.clone(), w.clone()
    plain, qk = plain.half(), qk.half()
    want = plain(per_token)
    got = qk(qkv.chunk(3, dim=-1)[0].view(2, 154, 3, 64).transpose(1, 2))  # impl's q: (B, H, L, E)
    assert got.shape == (2, 3, 154, 64) and torch.equal(got.transpose(1, 2), want)
