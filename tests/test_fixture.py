"""Synthetic full-size fixtures (``sd3parity fixture``): every tensor the released layouts hold, with the shapes
the references' own classes build (checked on the meta device), deterministic values, and files the loaders read."""
import hashlib

import pytest
import torch

from parity import fixture as FX
from parity.cli import main

PRESETS = ("sd3-medium", "sd3.5-large", "sd3.5-medium")


def _meta_state(cls, config: dict) -> dict:
    with torch.device("meta"):
        model = cls(**config) if not hasattr(cls, "config_class") else cls(cls.config_class(**config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", PRESETS)
def test_the_diffusers_layout_is_what_diffusers_and_transformers_build(preset):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from parity.convert import clip_config_json, diffusers_config, diffusers_vae_config, t5_config_json
    from impl.checkpoint import SD3_VAE

    files = {rel: {name: shape for name, shape, *_ in entries} for rel, entries in FX.plan(preset, "diffusers").items()}
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert files["transformer/diffusion_pytorch_model.safetensors"] == _meta_state(
        SD3Transformer2DModel, strip(diffusers_config(FX.presets()[preset])))
    assert files["vae/diffusion_pytorch_model.safetensors"] == _meta_state(AutoencoderKL,
                                                                          strip(diffusers_vae_config(SD3_VAE)))
    for rel, cls, cfg in (("text_encoder/model.safetensors", CLIPTextModelWithProjection, clip_config_json(FX.CLIP_L)),
                          ("text_encoder_2/model.safetensors", CLIPTextModelWithProjection, clip_config_json(FX.CLIP_G)),
                          ("text_encoder_3/model.safetensors", T5EncoderModel, t5_config_json(FX.T5_XXL))):
        want = {k: v for k, v in _meta_state(cls, cfg).items() if not k.endswith("position_ids")}
        assert files[rel] == want, rel


@pytest.mark.parametrize("preset", PRESETS)
def test_the_sai_single_file_is_recognised_as_its_preset(preset):
    from impl.checkpoint import PREFIXES, SD3_VAE, infer_mmdit, infer_vae, match_presets, split_text_encoders

    (rel, entries), = FX.plan(preset, "sai").items()
    assert rel == f"{preset}.safetensors"
    meta = {name: torch.empty(shape, device="meta") for name, shape, *_ in entries}
    parts = {p: {k[len(x):]: v for k, v in meta.items() if k.startswith(x)} for p, x in PREFIXES.items()}
    mc, _ = infer_mmdit(parts["mmdit"], rel)
    vc, _ = infer_vae(parts["vae"], rel)
    assert preset in match_presets(mc) and vc == SD3_VAE
    assert set(split_text_encoders(parts["text_encoders"], rel)) == {"clip_l", "clip_g", "t5"}


def test_values_are_deterministic_and_the_same_in_both_layouts(tmp_path):
    """The full-size VAE written twice in the diffusers layout: the same bytes; its attention q weight is the SAI
    file's (C, C, 1, 1) tensor squeezed, and the MMDiT's q, k, v are the thirds of the fused qkv."""
    from safetensors.torch import load_file

    vae = FX.plan("sd3-medium", "diffusers")["vae/diffusion_pytorch_model.safetensors"]
    digests = [FX.write_safetensors(tmp_path / f"vae{i}.safetensors", vae, 0, "bfloat16") for i in range(2)]
    assert digests[0] == digests[1] == hashlib.sha256((tmp_path / "vae0.safetensors").read_bytes()).hexdigest()
    stored = load_file(str(tmp_path / "vae0.safetensors"))
    assert len(stored) == len(vae) and {t.dtype for t in stored.values()} == {torch.bfloat16}
    sai_q = FX.value("vae:decoder.mid.attn_1.q.weight", (512, 512, 1, 1), 0, torch.bfloat16)
    assert torch.equal(stored["decoder.mid_block.attentions.0.to_q.weight"], sai_q[:, :, 0, 0])
    qkv = FX.value("mmdit:joint_blocks.0.x_block.attn.qkv.weight", (3 * 1536, 1536), 0, torch.bfloat16)
    entries = {e[0]: e for e in FX.plan("sd3-medium", "diffusers")["transformer/diffusion_pytorch_model.safetensors"]}
    assert entries["transformer_blocks.0.attn.to_k.weight"][2:] == (
        "mmdit:joint_blocks.0.x_block.attn.qkv.weight", tuple(qkv.shape), "split3.1")
    assert torch.equal(FX._transformed(qkv, "split3.1"), qkv[1536:3072])
    assert not torch.equal(FX.value("vae:x", (4,), 0, torch.float32), FX.value("vae:x", (4,), 1, torch.float32))
    assert torch.isfinite(stored["decoder.conv_out.weight"].float()).all()


def test_sizes_and_refusals(tmp_path, capsys):
    """Parameter counts of the released models: the SD3-Medium transformer's 2,028,328,000 parameters plus its
    192 x 192 x 1536 position table, T5-XXL's encoder 4,762,310,656, CLIP-L 123,650,304, CLIP-G 694,659,840."""
    import math

    counts = {k: sum(math.prod(s) for s in v.values()) for k, v in FX.components("sd3-medium").items()}
    assert counts["mmdit"] == 2_028_328_000 + 192 * 192 * 1536
    assert (counts["t5"], counts["clip_l"], counts["clip_g"]) == (4_762_310_656, 123_650_304, 694_659_840)
    tied = 32128 * 4096  # the diffusers layout stores T5's embedding under both names
    assert FX.plan_size("sd3-medium", "diffusers") == 2 * (sum(counts.values()) + tied)
    (tmp_path / "there").mkdir()
    assert main(["fixture", "sd3-medium", str(tmp_path / "there")]) == 2
    assert "exists" in capsys.readouterr().err
