"""The sai profile against the Stability-AI SD3.5 code itself: its tokenizers, encoders and ``get_cond``, its
sampling and VAE, from the checkout at ``$SD3PARITY_SAI_CODE`` or ``../shared/references/sd3.5``. The tests that
need the code are skipped without one; the rest (harness mechanics around the code) run everywhere."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import SAI_CODE, needs_sai, sai_form

from impl import sampling as S
from parity import flags as F
from parity.cli import main
from parity.run import Spec, check
from parity.sides import sai as SR


def sai(cache=None, **options):
    flags = options.pop("flags", {})
    options.setdefault("prompts", ("a cat",))
    return check(Spec(profile="sai", sai_code=SAI_CODE, overrides=tuple(sorted(flags.items())), **options), cache)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("sai") / "in.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


@needs_sai
@pytest.mark.parametrize("options", [
    {"prompts": ("a photo of a cat", "wow!! amazing! so cool!!!", "(masterpiece:1.2), a (red) cat, ((blue eyes))")},
    {"dtype": "float16"},
    {"dtype": "bfloat16", "flags": {"sampler": "sai_euler"}, "families": ("sd3.5-large",)},
    {"dtype": "float16", "flags": {"sampler": "sai_euler"}, "steps": 3, "families": ("sd3-medium",)},
    {"families": ("sd3.5-medium",), "slg": (1,), "steps": 6, "height": 48},  # skip-layer calls at step 1
], ids=["default", "float16", "bfloat16-euler", "float16-euler-3", "slg"])
def test_sai_profile_is_bitwise_equal_to_the_reference_code(options, ref_cache):
    report = sai(ref_cache, **options)
    assert report.first_divergence is None and not report.failures
    components = {r["component"] for r in report.records}
    assert {"clip-l", "clip-g", "t5", "conditioning", "mmdit", "sampler", "vae"} <= components
    assert "sd3.5 code" in report.sources["sai"] and report.sources["sai"]["sd3.5 code"]["sha256"]


@needs_sai
def test_sai_img2img_is_bitwise_equal_to_the_reference_code(image):
    report = sai(families=("sd3.5-large",), image=image, steps=4)
    assert report.first_divergence is None
    assert any(r["layer"].startswith("encoder.") for r in report.records)
    assert min(r["step"] for r in report.records if r["component"] == "mmdit" and r["step"] is not None) == 1  # int(4 * (1 - 0.6))


@needs_sai
def test_sai_checkpoint_is_bitwise_equal_to_the_reference_code(tmp_path):
    """A converted single file with its text encoders: impl loads it by identity, the code with its own loader."""
    from parity.convert import diffusers_to_sai_file
    from parity.embedded import model_dir

    diffusers_to_sai_file(model_dir("sd3.5-large"), tmp_path / "m.safetensors")
    report = sai(checkpoint=str(tmp_path / "m.safetensors"), config=str(model_dir("sd3.5-large")), dtype="float16")
    assert report.first_divergence is None and len(report.records) > 400


@needs_sai
@pytest.mark.parametrize("flag, options, first", [
    ("t5_activation=gelu_new", {}, ("t5", "block.0.layer.1.DenseReluDense.wo", None)),  # T11: transformers' GELU
    ("attention_order=image_first", {}, ("mmdit", "block.0.context.attn.proj", 0)),  # M3
    ("qk_norm_form=upcast", {"dtype": "bfloat16"}, ("mmdit", "block.0.context.attn.ln_q", 0)),  # M6 (context first)
    ("uint8=round", {}, ("vae", "image_uint8", None)),  # V3
    ("vae_attention=linear", {"dtype": "float16"}, ("vae", "decoder.mid.attn_1", None)),  # V1b
    ("schedule=diffusers", {"steps": 4}, ("sampler", "sigmas", None)),  # S3
    ("cfg_space=velocity", {}, ("sampler", "velocity", 0)),  # G2: the code guides x0
    ("cfg_always=false", {"guidance": 1.0}, ("sampler", "input.latent_in", 0)),  # G3: the code still runs uncond
    ("timestep_dtype=float32", {}, ("sampler", "input.timestep", 1)),  # S4
    ("latent_dtype=model", {}, ("sampler", "latent", 0)),  # S5: the code's latent stays float16 until the update
    ("cond_dtype=model", {}, ("sampler", "input.context", 0)),  # fix_cond
    ("noise=diffusers", {"dtype": "bfloat16"}, ("sampler", "input.latent_in", 0)),  # N1: bf16 noise
    ("slg=diffusers", {"slg": (1,), "steps": 6}, ("sampler", "x0", 1)),  # G5: scale 2.8 in the step-1 window
    ("shift=scheduler_config", {"families": ("sd3-medium",)}, ("sampler", "sigmas", None)),  # S2
    ("autocast=off", {}, ("mmdit", "patch_embed", 0)),  # N2: the code's convolution runs in float16
    ("autocast=off", {"dtype": "float16"}, ("mmdit", "block.0.context.attn.q", 0)),  # N2: LayerNorm in float32
    ("casts=diffusers", {}, ("mmdit", "tokens", 0)),  # N3: float16 patches + float32 pos_embed stay float32
])
def test_sai_flag_flips_against_the_reference_code(flag, options, first, ref_cache):
    name, value = F.parse_override(flag)
    options = {"families": ("sd3.5-medium",), **options}
    report = sai(ref_cache, flags={name: value}, **options)
    fd = report.first_divergence
    assert fd is not None and (fd["component"], fd["layer"], fd.get("step")) == first
    assert sai(ref_cache, **options).first_divergence is None  # the flag, not the settings


def test_every_new_text_flag_is_flipped_against_the_code():
    """The T5 activation is the one text-side difference between other_impls.py and transformers that changes
    float32 numbers (the k pre-scaling multiplies by a power of two; the LayerNorm variance dtype and the float16
    clamps only act outside float32, where the code never runs its encoders): test_t5_numerics_are_neutral."""
    assert F.BY_NAME["t5_activation"].sai == "gelu_tanh" and F.BY_NAME["t5_activation"].diffusers == "gelu_new"


def test_t5_numerics_are_neutral():
    """QUIRKS T11, measured: the code scales k by sqrt(d_kv) and lets SDPA divide by it; for d_kv a power of 4
    (16 here, 64 in T5-XXL) both are exact, so scores equal transformers' unscaled q k^T bitwise."""
    g = torch.Generator().manual_seed(0)
    for d in (16, 64):
        q, k, v = (torch.randn(1, 4, 77, d, generator=g) * 3 for _ in range(3))
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
        prescaled = torch.nn.functional.scaled_dot_product_attention(q, k * (d ** 0.5), v)
        assert torch.equal(plain, prescaled)


def test_sai_profile_without_the_code_is_refused(monkeypatch, capsys):
    monkeypatch.delenv(SR.ENV, raising=False)
    assert main(["check", "--profile", "sai", "--prompt", "a cat", "--text-only"]) == 2
    assert "--sai-code" in capsys.readouterr().err


def test_sai_code_dir_must_be_a_checkout(tmp_path, capsys):
    (tmp_path / "sd3_infer.py").write_text("")
    assert main(["check", "--profile", "sai", "--sai-code", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "sd3_impls.py" in err and "mmditx.py" in err


@needs_sai
@pytest.mark.parametrize("edit, message", [
    (("def do_sampling(\n        self,\n        latent,", "def do_sampling(\n        self,\n        latent,\n        extra,"),
     r"do_sampling\(latent, extra, .*\) differs from the supported API: required parameter 'extra' unknown to the "
     r"harness"),
    (("class SkipLayerCFGDenoiser(", "class SomethingElse("), r"do not import: cannot import name 'SkipLayerCFGDenoiser'"),
    (("def get_empty_latent(self, batch_size,", "def get_empty_latent(self, count,"),
     r"get_empty_latent\(count, width, height, seed, device\) differs .*'count' unknown"),
    # the first SD3.5 release's MMDiT-X path never updated x: weights loaded, never used
    (("x = x_block.post_attention_x(x_attn, attn2, *x_intermediates)", "pass"),
     r"its MMDiT never called \['joint_blocks.0.x_block.attn.proj'"),
])
def test_a_checkout_with_another_api_is_refused_by_name(edit, message, tmp_path, capsys):
    """A copy of the checkout with one definition changed (the way its API moved between commits): exit 3 and a
    message naming the function and what differs, never a traceback."""
    code = tmp_path / "sd3.5"
    shutil.copytree(SAI_CODE, code)
    for name in ("sd3_infer.py", "sd3_impls.py", "mmditx.py"):
        text = (code / name).read_text()
        if edit[0] in text:
            (code / name).write_text(text.replace(edit[0], edit[1], 1))
    assert main(["check", "--profile", "sai", "--sai-code", str(code), "--prompt", "a cat", "--family", "sd3.5-medium",
                 "--slg", "1", "--steps", "6"]) == 3
    err = capsys.readouterr().err
    import re

    assert re.search(message, err) and "Traceback" not in err


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


def test_joint_width_pads_to_the_t5_width():
    """get_cond's literal 4096 becomes the T5 width of the model, and nothing else changes."""
    x = torch.ones(1, 2, 80)
    with SR.joint_width(96):
        assert torch.nn.functional.pad(x, (0, 4096 - 80)).shape == (1, 2, 96)
        assert torch.nn.functional.pad(x, (0, 3)).shape == (1, 2, 83)
    assert torch.nn.functional.pad(x, (0, 4096 - 80)).shape == (1, 2, 4096)


def test_fix_cond_rounds_the_conditioning_to_float16():
    """sd3_infer.fix_cond: ``.half()`` on context and pooled whatever the model dtype (float32 here)."""
    seen = []

    def model(x, t, y, context, skip_layers=()):
        seen.append((y, context))
        return torch.zeros(x.shape, dtype=x.dtype)

    g = torch.Generator().manual_seed(0)
    c = S.Conditioning(torch.randn(1, 3, 8, generator=g), torch.randn(1, 4, generator=g))
    S.denoise(model, torch.zeros(1, 16, 2, 2), c, c, S.SamplerSettings(steps=1, form=sai_form()))
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


@needs_sai
def test_cli_check_json_is_bitwise_and_fingerprints_the_code(capsys):
    assert main(["check", "--json", "--profile", "sai", "--sai-code", SAI_CODE, "--prompt", "a cat",
                 "--family", "sd3-medium"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["first_divergence"] is None and out["reference"] == "sai"
    assert len(out["sources"]["sai"]["sd3.5 code"]["sha256"]) == 64
