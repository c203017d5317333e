"""Each image-side flag flipped alone on the embedded SD3.5-Medium-shaped model: where the first divergence from
diffusers appears in execution order (or that there is none, with the reason). The reference runs once per
configuration (``ref_cache``) and is compared with every impl variant."""
import pytest
import torch

from parity import flags as F
from parity.run import Spec, check, resolve

pytest.importorskip("diffusers")

IMG = {"image": True, "steps": 4}  # img2img from a 64x64 test picture: start index 1 of 4 (strength 0.6)
FLIPS = [  # (flag, run options, first divergence (component, layer, step) or None)
    ("attention_order=context_first", {}, ("mmdit", "block.0.context.attn.proj", 0)),  # M3: the joint softmax order
    ("qk_norm_form=native", {"dtype": "bfloat16"}, ("mmdit", "block.0.x.attn.ln_q", 0)),  # M6: half precision
    ("qk_norm_form=native", {}, None),  # M6: the same operations in float32
    ("qk_norm_form=fused", {"dtype": "bfloat16"}, ("mmdit", "block.0.x.attn.ln_q", 0)),  # M6: F.rms_norm rounds once
    ("sampler=sai_euler", {}, ("sampler", "latent", 0)),  # S1/S6: step 0's update
    ("sampler=sai_dpmpp_2m", {}, ("sampler", "latent", 0)),
    ("schedule=sai", {"steps": 4}, ("sampler", "sigmas", None)),  # S3
    # G2: the batch order alone: each row's kernels are row-invariant on CPU (the branches pair by name)
    ("cfg_batch=cond_first", {}, None),
    ("cfg_space=x0", {}, ("sampler", "x0", 0)),  # G2: impl guides x0, diffusers the velocity
    ("cfg_always=true", {"guidance": 1.0}, ("sampler", "input.latent_in", 0)),  # G3: an uncond branch only impl runs
    ("timestep_dtype=float16", {}, ("sampler", "input.timestep", 1)),  # S4: sigma 1 -> 1000 exactly at step 0
    ("latent_dtype=float16", {}, ("sampler", "input.latent_in", 0)),  # S5: the start latent rounded to fp16
    ("latent_dtype=float16", {"dtype": "bfloat16"}, ("sampler", "latent", 0)),  # S5: fp32 latent vs bf16
    ("cond_dtype=float16", {}, ("sampler", "input.context", 0)),  # fix_cond
    ("noise=sai", {}, ("sampler", "input.latent_in", 0)),  # N1: the fp16 noise
    ("noise=sai", IMG, ("sampler", "input.latent_in", 1)),  # N1: other posterior and noise draws
    ("slg=sai", {"slg": (1,), "steps": 6}, ("sampler", "velocity", 1)),  # G5: scale 2.5 in the step-1 window
    ("img2img=sai", IMG, ("vae", "encoder.conv_in", None)),  # S7: the contiguous input (then the start index)
    ("shift=sai_config", {"families": ("sd3-medium",)}, ("sampler", "sigmas", None)),  # S2: shift 1.0
    ("autocast=cuda_fp16", {}, ("mmdit", "patch_embed", 0)),  # N2: the patch conv in float16
    ("autocast=cuda_fp16", {"dtype": "float16"}, ("mmdit", "block.0.x.attn.q", 0)),  # N2: LayerNorm in float32
    # N3: no-op while every tensor has the model dtype (against the SD3.5 code under autocast: test_sai_reference)
    ("casts=sai", {}, None),
    ("uint8=truncate", {}, ("vae", "image_uint8", None)),  # V3: only the last record
    # M4: one GEMM or three on CPU (oneDNN/MKL) gave bitwise equal q, k, v for every size tried, fp32/bf16/fp16
    ("qkv_fusion=fused", {}, None),
    # V1b: with batch 1 the 1x1 convs and the Linear layers agree here; batch 2 differs (test_vae_bitwise)
    ("vae_attention=conv", {}, None),
    ("modulate=addcmul", {}, ("mmdit", "block.0.x.attn.q", 0)),  # M7: ComfyUI's fused adaLN (image first here)
    ("half_compute=float32", {"dtype": "bfloat16"}, ("sampler", "input.latent_in", 0)),  # N4: float32 noise
    ("cfg_lengths=split", {}, None),  # G6: diffusers' contexts always have one length
    ("cfg_skip=one", {"guidance": 0.5}, ("sampler", "input.latent_in", 0)),  # G3: ComfyUI guides below 1 too
    ("fp8_weight_layout=column_major", {}, None),  # N5: scaled-fp8 files only (tests/test_comfyui.py flips it)
]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("flips") / "in.png"
    Image.fromarray((np.arange(64 * 64 * 3).reshape(64, 64, 3) * 37 % 256).astype(np.uint8)).save(path)
    return str(path)


def spec(options: dict, image: str, **flags) -> Spec:
    opts = {"families": ("sd3.5-medium",), **options}
    if opts.pop("image", False):
        opts["image"] = image
    return Spec(prompts=("a cat",), overrides=tuple(sorted(flags.items())), **opts)


def impl_arguments(s: Spec) -> dict:
    """The plain values impl receives for the image side of a run."""
    from dataclasses import asdict

    opts = resolve(s).opts
    return {**asdict(opts["mmdit"]), **asdict(opts["form"]), "vae_attention": opts["vae_attention"],
            "uint8": opts["uint8"], "autocast": opts["autocast"], "fp8_weight_layout": opts["fp8_weight_layout"]}


@pytest.mark.parametrize("flag, options, first", FLIPS)
def test_image_flag_flip(flag, options, first, image, ref_cache):
    name, value = F.parse_override(flag)
    report = check(spec(options, image, **{name: value}), ref_cache)
    fd = report.first_divergence
    assert (None if fd is None else (fd["component"], fd["layer"], fd.get("step"))) == first
    if first is None:  # no divergence: the flag reached impl all the same (impl received another plain value)
        assert impl_arguments(spec(options, image, **{name: value})) != impl_arguments(spec(options, image))
    else:
        assert check(spec(options, image), ref_cache).first_divergence is None  # the flag, not the settings


def test_every_image_flag_is_flipped():
    image = {f.name for f in F.FLAGS if f.side == "image"}
    assert image == {flag.split("=")[0] for flag, _, _ in FLIPS}
    for f in F.FLAGS:
        if f.side == "image":  # a flag: two references differ on it
            values = (f.diffusers, f.sai, f.comfyui)
            assert len(set(values)) > 1 and set(values) <= set(f.choices), f.name


def test_fused_and_split_projections_agree_on_cpu():
    """The measured fact behind qkv_fusion's empty flip (QUIRKS M4 reports ulp differences on GPUs)."""
    import torch.nn.functional as tf

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 333, 192, generator=g).to(dtype)
        w, b = torch.randn(576, 192, generator=g).to(dtype), torch.randn(576, generator=g).to(dtype)
        fused = tf.linear(x, w, b).chunk(3, dim=-1)
        split = [tf.linear(x, wi, bi) for wi, bi in zip(w.chunk(3), b.chunk(3))]
        assert all(torch.equal(p, q) for p, q in zip(fused, split))
