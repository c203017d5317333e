"""Named compatibility flags: the value each reference uses, with a one-line provenance, and the profiles.

A profile is only a named set of flag values. ``settings(profile, overrides)`` turns one into the plain-valued
``impl.text.TextSettings`` that impl receives (impl never sees a profile name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from impl.text import TextSettings


@dataclass(frozen=True)
class Flag:
    name: str
    quirk: str  # id in QUIRKS.md
    choices: tuple
    diffusers: Any
    sai: Any
    provenance: str
    changes: str  # what flipping it changes
    side: str = "text"  # "text" or "image"


FLAGS: tuple[Flag, ...] = (
    Flag("clip_l_tokenizer", "T1", ("openai", "hf", "hf-bang-pad", "hf-slow-noftfy"), "hf", "hf",
         "diffusers StableDiffusion3Pipeline.tokenizer = transformers CLIPTokenizer (Rust in 5.x); sd3.5 "
         "other_impls.SD3Tokenizer: CLIPTokenizer.from_pretrained (slow+ftfy = 'openai' under transformers 4.x)",
         "ids of prompts with HTML entities, fancy Unicode, mojibake (TOKENIZERS.md)"),
    Flag("clip_g_tokenizer", "T4", ("openai", "hf", "hf-bang-pad", "hf-slow-noftfy"), "hf-bang-pad", "hf",
         "diffusers tokenizer_2/tokenizer_config.json registers '!' as special pad (diffusers#4153); sd3.5 "
         "SD3Tokenizer reuses the CLIP-L tokenizer object for CLIP-G",
         "every '!' becomes id 0 and is split out before BPE; CLIP-G states from the first '!' on"),
    Flag("clip_l_pad", "T4", (0, 49407), 49407, 49407,
         "diffusers tokenizer pad_token <|endoftext|>; sd3.5 SDTokenizer(pad_with_end=True)",
         "CLIP-L states at padded positions (all 77 rows reach the MMDiT)"),
    Flag("clip_g_pad", "T4", (0, 49407), 0, 0,
         "diffusers tokenizer_2 pad_token '!' = id 0; sd3.5 SDXLClipGTokenizer(pad_with_end=False)",
         "CLIP-G states at padded positions"),
    Flag("sai_wordwise", "T1-T3", (False, True), False, True,
         "sd3.5 other_impls.SDTokenizer.tokenize_with_weights (token_weights parser, per-word tokenization, "
         "77-slot chunks, chunk 0 encoded); diffusers tokenizes the whole string",
         "prompts with (weights:1.2) parens or more than 75 tokens"),
    Flag("t5_length_rule", "T8", ("max_length", "sai"), "max_length", "sai",
         "diffusers _get_t5_prompt_embeds padding='max_length' (max_sequence_length=256, PR #8506); sd3.5 "
         "T5XXLTokenizer: text[:226], min_length=77, pad 0",
         "T5 sequence length (256 vs >= 77) and, without a mask, every T5 state (T9)"),
    Flag("t5_max_length", "T8", (77, 256, 512), 256, 256,
         "diffusers StableDiffusion3Pipeline.__call__ max_sequence_length default 256 (77 in 0.29.0)",
         "with t5_length_rule=max_length: padding length and hence every T5 state"),
    Flag("t5_mask", "T9", (False, True), False, False,
         "neither diffusers (diffusers#8673, intentional) nor sd3.5 passes an attention mask to T5",
         "T5 states of real tokens stop depending on the padding length"),
    Flag("t5_attention", "T9 (impl)", ("sdpa", "eager"), "sdpa", "sdpa",
         "transformers 5.x T5Attention: SDPA, position bias as attn_mask, scale 1 (both pinned profiles); "
         "transformers 4.57 eager: q k^T + bias, float32 softmax, times v (measured: up to 52 ulp at block 0)",
         "every T5 state from block 0's attention output on"),
    Flag("t5_absent", "T10", (None, "zeros", "none"), None, None,
         "diffusers encode_prompt with text_encoder_3=None: zeros (B, L, joint) (L=256 from 0.36.0, PR #12531); "
         "ComfyUI appends no rows; sd3.5 requires T5",
         "context length and the rows the context_embedder sees"),
    Flag("clip_pool", "T6", ("argmax", "first_eos"), "argmax", "argmax",
         "transformers CLIPTextModel pools at argmax(ids) when config.eos_token_id == 2 (SD3 configs); sd3.5 "
         "CLIPTextModel_ argmax",
         "pooled vector when an id larger than EOS occurs before the first EOS"),
    Flag("clip_l_pooled_projected", "T6", (True, False), True, False,
         "diffusers _get_clip_prompt_embeds uses text_embeds (projected) for both; sd3.5 ClipL "
         "return_projected_pooled=False",
         "CLIP-L half of the pooled vector (0 for real SD3 weights: their CLIP-L projection is the identity)"),
    Flag("encoder_dtype", "T7", ("pipeline", "float32"), "pipeline", "float32",
         "diffusers runs encoders in the pipeline dtype; sd3.5 sd3_infer builds CLIP/T5 in float32 on CPU",
         "embeddings in half precision (~1e-3 rel. fp16, ~1e-2 bf16)"),
    # image side
    Flag("attention_order", "M3", ("image_first", "context_first"), "image_first", "context_first",
         "diffusers JointAttnProcessor2_0 cat([image, context]); sd3.5 mmditx.block_mixing cat([context, x])",
         "every joint attention output by ulps (softmax sums in another order)", "image"),
    Flag("qkv_fusion", "M4", ("split", "fused"), "split", "fused",
         "diffusers to_q/to_k/to_v (the converter splits the fused weight); sd3.5 SelfAttention.qkv one Linear",
         "q, k, v by GEMM blocking (ulps; equal on the tiny embedded sizes)", "image"),
    Flag("qk_norm_form", "M6", ("upcast", "native"), "upcast", "native",
         "diffusers RMSNorm: float32 variance, cast to weight dtype, times weight (per head); sd3.5 mmditx.RMSNorm in "
         "the input dtype, on the per-token (B, L, H, E) view",
         "qk-norm outputs in half precision (equal in float32)", "image"),
    Flag("vae_attention", "V1b", ("linear", "conv"), "linear", "conv",
         "diffusers AutoencoderKL Attention to_q/k/v Linear; sd3.5 AttnBlock 1x1 Conv2d",
         "VAE mid-block attention by ulps, then every later decoder layer", "image"),
    Flag("sampler", "S1 S3-S6 G2 G3 N1", ("diffusers_euler", "sai_euler", "sai_dpmpp_2m"), "diffusers_euler",
         "sai_dpmpp_2m", "diffusers FlowMatchEulerDiscreteScheduler + velocity CFG [uncond, cond]; sd3.5 "
         "sd3_impls.sample_dpmpp_2m/sample_euler on x0, CFGDenoiser [cond, uncond], fp16 latent and s_in",
         "timesteps (fp16-rounded), batch order, CFG space, every step's latent", "image"),
    Flag("uint8", "V3", ("round", "truncate"), "round", "truncate",
         "diffusers VaeImageProcessor.numpy_to_pil round(); sd3.5 vae_decode astype(uint8)",
         "about half of the pixels by 1", "image"),
)
BY_NAME = {f.name: f for f in FLAGS}
PROFILES = ("diffusers", "sai")


def profile_values(profile: str) -> dict[str, Any]:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    return {f.name: getattr(f, profile) for f in FLAGS}


def parse_override(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (name, typed value), checked against the flag's choices."""
    name, sep, raw = text.partition("=")
    if not sep or name not in BY_NAME:
        raise ValueError(f"--flag {text!r}: expected NAME=VALUE with NAME one of {', '.join(BY_NAME)}")
    flag = BY_NAME[name]
    for choice in flag.choices:
        if str(choice).lower() == raw.lower():
            return name, choice
    raise ValueError(f"--flag {name}: {raw!r} is not one of {', '.join(map(str, flag.choices))}")


def image_options(values: dict[str, Any]) -> dict[str, Any]:
    """The image-side flag values as impl arguments."""
    from impl.mmdit import MMDiTOptions

    return {"mmdit": MMDiTOptions(attention_order=values["attention_order"], qkv=values["qkv_fusion"],
                                  qk_norm=values["qk_norm_form"]),
            "vae_attention": values["vae_attention"], "sampler": values["sampler"], "uint8": values["uint8"]}


def settings(values: dict[str, Any]) -> TextSettings:
    return TextSettings(
        clip_l_mode=values["clip_l_tokenizer"], clip_g_mode=values["clip_g_tokenizer"],
        clip_l_pad=values["clip_l_pad"], clip_g_pad=values["clip_g_pad"], sai_wordwise=values["sai_wordwise"],
        t5_mode="hf", t5_length_rule=values["t5_length_rule"], t5_max_length=values["t5_max_length"],
        t5_mask=values["t5_mask"], t5_attention=values["t5_attention"], t5_absent=values["t5_absent"],
        t5_absent_length=values["t5_max_length"],
        clip_pool=values["clip_pool"], clip_l_pooled_projected=values["clip_l_pooled_projected"],
        encoder_dtype=torch.float32 if values["encoder_dtype"] == "float32" else None,
    )
