"""Each image-side flag flipped through `sd3parity check` on the embedded SD3.5-Medium-shaped model: where the
first divergence from diffusers appears (or that there is none, with the reason)."""
import json

import pytest
import torch

from parity import flags as F
from parity.cli import main

pytest.importorskip("diffusers")

FLIPS = [
    ("attention_order=context_first", [], ("mmdit", "block.0.x.attn.proj")),  # M3: the joint softmax order
    ("qk_norm_form=native", ["--dtype", "bfloat16"], ("mmdit", "block.0.x.attn.ln_q")),  # M6: half precision only
    ("qk_norm_form=native", [], None),  # M6: the same operations in float32
    ("sampler=sai_euler", [], ("sampler", "input.latent_in")),  # N1/S5: the noise is rounded to the fp16 latent
    ("sampler=sai_dpmpp_2m", [], ("sampler", "input.latent_in")),
    ("uint8=truncate", [], ("vae", "image_uint8")),  # V3: only the last record
    # M4: one GEMM or three on CPU (oneDNN/MKL) gave bitwise equal q, k, v for every size tried, fp32/bf16/fp16
    ("qkv_fusion=fused", [], None),
    # V1b: with batch 1 the 1x1 convs and the Linear layers agree here; batch 2 differs (test_vae_bitwise)
    ("vae_attention=conv", [], None),
]


@pytest.mark.parametrize("flag, extra, first", FLIPS)
def test_image_flag_flip(flag, extra, first, capsys):
    rc = main(["check", "--json", "--family", "sd3.5-medium", "--prompt", "a cat", "--flag", flag, *extra])
    out = json.loads(capsys.readouterr().out)
    fd = out["first_divergence"]
    assert rc == (0 if first is None else 1)
    assert (None if fd is None else (fd["component"], fd["layer"])) == first


def test_every_image_flag_is_flipped():
    image = {f.name for f in F.FLAGS if f.side == "image"}
    assert image == {flag.split("=")[0] for flag, _, _ in FLIPS}
    for f in F.FLAGS:
        if f.side == "image":
            assert f.diffusers != f.sai and {f.diffusers, f.sai} <= set(f.choices)


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
