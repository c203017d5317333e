"""Named compatibility flags: the value each reference uses, with a one-line provenance, and the profiles.

A profile is only a named set of flag values. ``settings`` and ``image_options`` turn the values of a run into
the plain values impl receives (impl never sees a profile name); they are the only code that reads flags.
``catalogue()`` writes the quirk catalogue (``QUIRKS.md``) from the provenance lines here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


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
    comfyui: Any = None  # ComfyUI's value (``COMFYUI``)
    comfyui_provenance: str = ""


FLAGS: tuple[Flag, ...] = (
    Flag("clip_l_tokenizer", "T1", ("openai", "hf", "hf-bang-pad", "hf-slow-noftfy"), "hf", "hf",
         "diffusers StableDiffusion3Pipeline.tokenizer = transformers CLIPTokenizer (Rust in 5.x); sd3.5 "
         "other_impls.SD3Tokenizer: CLIPTokenizer.from_pretrained (slow+ftfy = 'openai' under transformers 4.x)",
         "ids of prompts with HTML entities, fancy Unicode or mojibake (the tokenizers clean text differently)"),
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
    Flag("prompt_split", "T1-T3", ("whole", "words", "segments"), "whole", "words",
         "sd3.5 other_impls.SDTokenizer.tokenize_with_weights (token_weights parser, per-word tokenization, "
         "77-slot chunks, chunk 0 encoded); diffusers tokenizes the whole string",
         "prompts with (weights:1.2) parens or more than 75 tokens: the ids, and which tokens reach chunk 0"),
    Flag("prompt_weights", "T2", ("discard", "apply"), "discard", "discard",
         "diffusers has no weight syntax; sd3.5 SDTokenizer parses the weights and SDClipModel encodes the ids only",
         "weighted prompts: an empty sequence joins the encoder batch and weighted tokens become "
         "(z - z_empty) * w + z_empty, in CLIP and T5"),
    Flag("clip_chunks", "T3", ("first", "all"), "first", "first",
         "diffusers truncates to 77 tokens; sd3.5 SD3Inferencer.get_cond encodes chunk 0 of the CLIP tokens",
         "prompts over 75 CLIP tokens: 77 context rows per chunk (231 for three)"),
    Flag("t5_length_rule", "T8", ("max_length", "sai", "min77"), "max_length", "sai",
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
    Flag("attention_kernel", "N6", ("sdpa", "sub_quad"), "sdpa", "sdpa",
         "diffusers AttnProcessor2_0 / JointAttnProcessor2_0 and transformers' sdpa attention; sd3.5 other_impls."
         "attention and mmditx: torch.nn.functional.scaled_dot_product_attention everywhere",
         "every attention output by ulps: CLIP and T5 (matrix products, scale after q k^T), the MMDiT "
         "(baddbmm per query chunk, chunk sizes from free memory) and the VAE (query slices, with "
         "vae_attention=conv: ComfyUI's layout); with it, every later state"),
    Flag("t5_activation", "T11", ("gelu_new", "gelu_tanh"), "gelu_new", "gelu_tanh",
         "transformers T5DenseGatedActDense: ACT2FN['gelu_new'] for feed_forward_proj 'gated-gelu' (a hand-written "
         "tanh formula); sd3.5 other_impls.T5DenseGatedActDense: torch.nn.functional.gelu(approximate='tanh')",
         "every T5 state from block 0's feed-forward (wo) on, by ulps in float32"),
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
    Flag("single_file_clip_l_projection", "T6", ("file", "identity"), "identity", "file",
         "diffusers single_file_utils.create_diffusers_clip_model_from_ldm: text_encoders.clip_l of an SD3 single "
         "file gets text_projection = torch.eye, whatever the file holds; sd3.5 load_into fills it from the file",
         "single files whose CLIP-L projection is not the identity (not the released ones): CLIP-L's projected "
         "output and the diffusers pooled vector"),
    Flag("encoder_dtype", "T7", ("pipeline", "float32"), "pipeline", "float32",
         "diffusers runs encoders in the pipeline dtype; sd3.5 sd3_infer builds CLIP/T5 in float32 on CPU",
         "embeddings in half precision (~1e-3 rel. fp16, ~1e-2 bf16)"),
    Flag("text_encoder_storage", "T7", ("as_loaded", "float16"), "as_loaded", "as_loaded",
         "diffusers and sd3.5 keep the encoder weights in the dtype they compute in",
         "every text state: the weights rounded to float16 (3e-3 to 7e-3 on the embedded model's states)"),
    Flag("empty_encoder_text", "T12", ("prompt", "empty"), "prompt", "prompt",
         "diffusers StableDiffusion3Pipeline.encode_prompt: prompt_2 = prompt_2 or prompt, prompt_3 = prompt_3 or "
         "prompt (an empty CLIP-G or T5 text is the CLIP-L text); sd3.5 sd3_infer.get_cond encodes one prompt for "
         "the three encoders (per-encoder texts are refused there)",
         "per-encoder texts (--prompt-clip-g / --prompt-t5) given as empty: the ids and states of that encoder"),
    # image side
    Flag("attention_order", "M3", ("image_first", "context_first"), "image_first", "context_first",
         "diffusers JointAttnProcessor2_0 cat([image, context]); sd3.5 mmditx.block_mixing cat([context, x])",
         "every joint attention output by ulps (softmax sums in another order)", "image"),
    Flag("qkv_fusion", "M4", ("split", "fused"), "split", "fused",
         "diffusers to_q/to_k/to_v (the converter splits the fused weight); sd3.5 SelfAttention.qkv one Linear",
         "q, k, v by GEMM blocking (ulps; equal on the tiny embedded sizes)", "image"),
    Flag("qk_norm_form", "M6", ("upcast", "native", "fused"), "upcast", "native",
         "diffusers RMSNorm: float32 variance, cast to weight dtype, times weight (per head); sd3.5 mmditx.RMSNorm in "
         "the input dtype, on the per-token (B, L, H, E) view",
         "qk-norm outputs in half precision (equal in float32)", "image"),
    Flag("casts", "N3", ("diffusers", "sai"), "diffusers", "sai",
         "diffusers casts back: PatchEmbed (latent + pos_embed).to(latent.dtype), the timestep projection to the "
         "pooled dtype, AdaLayerNormContinuous silu(emb).to(x.dtype), the attention output to the query dtype; "
         "sd3.5 mmditx lets them promote (t_embedder(t, dtype=x.dtype))",
         "nothing while every tensor has the model dtype; under autocast the residual stream's dtype", "image"),
    Flag("modulate", "M7", ("mul_add", "addcmul"), "mul_add", "mul_add",
         "diffusers AdaLayerNormZero norm(x) * (1 + scale) + shift; sd3.5 mmditx.modulate x * (1 + scale) + shift",
         "every adaLN-modulated input (each block's attention and MLP input, the final layer) by ulps", "image"),
    Flag("vae_attention", "V1b", ("linear", "conv"), "linear", "conv",
         "diffusers AutoencoderKL Attention to_q/k/v Linear; sd3.5 AttnBlock 1x1 Conv2d",
         "VAE mid-block attention by ulps, then every later decoder layer", "image"),
    Flag("sampler", "S1 S6", ("diffusers_euler", "sai_euler", "sai_dpmpp_2m"), "diffusers_euler", "sai_dpmpp_2m",
         "diffusers FlowMatchEulerDiscreteScheduler.step x + dt * v; sd3.5 sd3_infer --sampler dpmpp_2m by default "
         "(euler for Large-Turbo): sd3_impls.sample_dpmpp_2m / sample_euler on the x0 prediction",
         "the update of every step (rounding for sai_euler; the 2M correction from the second step on)", "image"),
    Flag("schedule", "S3", ("diffusers", "sai", "sgm_uniform", "simple"), "diffusers", "sai",
         "diffusers FlowMatchEulerDiscreteScheduler.set_timesteps: np.linspace in float64, shifted again, cast to "
         "float32; sd3.5 SD3Inferencer.get_sigmas: torch.linspace and the shift in float32",
         "sigmas and timesteps by at most 1.2e-7 (sai vs diffusers); every sigma (sgm_uniform, simple)", "image"),
    Flag("cfg_batch", "G2", ("uncond_first", "cond_first"), "uncond_first", "cond_first",
         "diffusers torch.cat([negative_prompt_embeds, prompt_embeds]); sd3.5 CFGDenoiser torch.cat([cond, uncond])",
         "which batch row each branch is computed in (equal on CPU here: the kernels are row-invariant)", "image"),
    Flag("cfg_space", "G2", ("velocity", "x0"), "velocity", "x0",
         "diffusers uncond + scale * (cond - uncond) on the transformer output in its dtype; sd3.5 CFGDenoiser on "
         "apply_model's x0 = x - v * sigma in float32",
         "the guided output (recorded as velocity or x0) and every latent after it", "image"),
    Flag("cfg_lengths", "G6", ("concat", "split"), "concat", "concat",
         "diffusers pads every context to one length (never unequal); sd3.5 CFGDenoiser torch.cat([cond, uncond]) "
         "(fails on unequal lengths, e.g. a T5 prompt over 77 tokens against the empty negative)",
         "prompts whose context length differs from the negative's: two batch-1 calls instead of one batch",
         "image"),
    Flag("cfg_always", "G3", (False, True), False, True,
         "diffusers do_classifier_free_guidance = guidance_scale > 1; sd3.5 CFGDenoiser batches [cond, uncond] at "
         "any cfg (Large-Turbo runs cfg 1.0)",
         "at guidance <= 1: an uncond branch and uncond + (cond - uncond) * 1 instead of cond", "image"),
    Flag("cfg_skip", "G3", ("at_most_one", "one"), "at_most_one", "at_most_one",
         "diffusers do_classifier_free_guidance = guidance_scale > 1 (sd3.5: cfg_always, the rule is not reached)",
         "guidance below 1: an uncond branch and uncond + (cond - uncond) * scale instead of cond alone", "image"),
    Flag("timestep_dtype", "S4", ("float32", "float16"), "float32", "float16",
         "diffusers timesteps = sigmas * 1000 in float32; sd3.5 sample_*: sigma * s_in with s_in = x.new_ones() "
         "of the float16 latent, then BaseModel.apply_model (sigma * 1000).float()",
         "every timestep (by up to 0.46 at 28 steps) and the sigma of x0 = x - v * sigma", "image"),
    Flag("latent_dtype", "S5", ("model", "float16"), "model", "float16",
         "diffusers scheduler.step casts the new latent to the model dtype; sd3.5 do_sampling latent.half(), "
         "float32 from the first update on",
         "the start latent (rounded to float16) and, in half precision, every latent", "image"),
    Flag("cond_dtype", "N3", ("model", "float16"), "model", "float16",
         "diffusers passes prompt_embeds in the pipeline dtype; sd3.5 SD3Inferencer.fix_cond: cond[0].half(), "
         "cond[1].half() whatever the model dtype (measured against the code, session 3)",
         "context and pooled rounded through float16 before the model sees them", "image"),
    Flag("noise", "N1", ("diffusers", "sai"), "diffusers", "sai",
         "diffusers randn_tensor(shape, generator, dtype=prompt dtype), img2img posterior drawn first from the same "
         "generator; sd3.5 get_noise: float32 randn from torch.manual_seed(seed) cast to the float16 latent, "
         "posterior an unseeded randn_like (drawn from seed + 1 here)",
         "the noise rounded to float16; img2img: other posterior and noise draws", "image"),
    Flag("slg", "G5", ("diffusers", "sai", "comfyui"), "diffusers", "sai",
         "diffusers skip_layer_guidance_scale default 2.8; sd3.5 sd3_infer CONFIGS sd3.5_medium skip_layer_config "
         "scale 2.5 (both add the term in their CFG space, cfg_space)",
         "the guided output of the steps in the skip window", "image"),
    Flag("img2img", "S7", ("diffusers", "sai", "comfyui"), "diffusers", "sai",
         "diffusers get_timesteps t_start = int(N - min(N * strength, N)), scale_noise with sigma in the latent "
         "dtype, VaeImageProcessor's channels-last image; sd3.5 sigmas[int(steps * (1 - denoise)):], "
         "noise_scaling with the float32 sigma, vae_encode's contiguous image",
         "img2img: the first step run (8 vs 7 of 40 at 0.8), the start latent, the encoder input", "image"),
    Flag("shift", "S2 G4", ("scheduler_config", "sai_config", "comfyui"), "scheduler_config", "sai_config",
         "diffusers reads scheduler/scheduler_config.json (shift 3.0 in every SD3 and SD3.5 release); sd3.5 "
         "sd3_infer CONFIGS: shift 1.0 for sd3_medium, 3.0 for the others (--shift overrides both)",
         "SD3-Medium: every sigma and timestep", "image"),
    Flag("autocast", "N2 V2", ("off", "cuda_fp16"), "off", "cuda_fp16",
         "diffusers runs every op in the module dtype; sd3.5 sd3_impls.sample_euler / sample_dpmpp_2m and "
         "SDVAE.encode / decode are decorated @torch.autocast('cuda', dtype=torch.float16) (emulated off CUDA: "
         "impl.autocast, op lists from torch's ATen/autocast_mode.h)",
         "Linear, SDPA and convolutions in float16, norms, softmax, exp and upsampling in float32", "image"),
    Flag("half_compute", "N4", ("native", "float32"), "native", "native",
         "diffusers and sd3.5 compute in the model dtype (bfloat16 / float16 weights, bfloat16 / float16 ops)",
         "half-precision runs: the MMDiT's weights rounded to the run dtype but every op, the latent and the VAE in "
         "float32", "image"),
    Flag("fp8_weight_layout", "N5", ("row_major", "column_major"), "row_major", "row_major",
         "neither diffusers nor sd3.5 reads scaled-fp8 single files (the harness refuses them by name there); a "
         "dequantized weight in the layout it is stored in is what torch.nn.Linear computes with",
         "scaled-fp8 files only: every scaled linear layer's output by ulps (another product kernel)", "image"),
    Flag("uint8", "V3", ("round", "truncate"), "round", "truncate",
         "diffusers VaeImageProcessor.numpy_to_pil round(); sd3.5 vae_decode astype(uint8)",
         "about half of the pixels by 1", "image"),
)

C = "ComfyUI 8d9faaa1 "
# the skip-layer window's (start, stop) of each slg value: both references' steps window; ComfyUI's node's percents
SLG_WINDOWS = {"diffusers": (0.01, 0.2), "sai": (0.01, 0.2), "comfyui": (0.01, 0.15)}
SLG_SCALES = {"diffusers": 2.8, "sai": 2.5, "comfyui": 3.0}
# ComfyUI's value of every flag, with where it comes from (file:line in ComfyUI at 8d9faaa1); run from a checkout
# (--comfyui), never copied. Values that only the example workflow chooses say so.
COMFYUI: dict[str, tuple[Any, str]] = {
    "clip_l_tokenizer": ("hf", C + "comfy/sd1_clip.py:490 transformers CLIPTokenizer.from_pretrained(comfy/sd1_tokenizer)"),
    "clip_g_tokenizer": ("hf", C + "comfy/sdxl_clip.py:21 the same sd1_tokenizer files ('!' is no special token there)"),
    "clip_l_pad": (49407, C + "comfy/sd1_clip.py:487 SDTokenizer(pad_with_end=True)"),
    "clip_g_pad": (0, C + "comfy/sdxl_clip.py:21 SDXLClipGTokenizer(pad_with_end=False)"),
    "prompt_split": ("segments", C + "comfy/sd1_clip.py:586-615 each weighted segment tokenized whole (cut only "
                     "before ' embedding:')"),
    "prompt_weights": ("apply", C + "comfy/sd1_clip.py:28-66 ClipTokenWeightEncoder.encode_token_weights (CLIP and T5)"),
    "clip_chunks": ("all", C + "comfy/sd1_clip.py:53-66 every chunk encoded, concatenated along the sequence"),
    "t5_length_rule": ("min77", C + "comfy/text_encoders/sd3_clip.py:33 T5XXLTokenizer(min_length=77, "
                       "max_length=99999999): no character cut"),
    "t5_max_length": (256, "not used by ComfyUI (t5_length_rule min77)"),
    "t5_mask": (False, C + "comfy/text_encoders/sd3_clip.py:53 t5_attention_mask=False"),
    "t5_attention": ("sdpa", C + "comfy/text_encoders/t5.py:164 optimized_attention(q, k * sqrt(d_kv), v, mask=bias): "
                     "SDPA (--use-pytorch-cross-attention) with scale 1 in effect"),
    "attention_kernel": ("sdpa", C + "comfy/model_management.py:351-360 PyTorch attention with "
                         "--use-pytorch-cross-attention (the side's default, --comfyui-attention sdpa) and by default "
                         "on NVIDIA GPUs; without it (its CPU default: --comfyui-attention sub_quad) "
                         "comfy/ldm/modules/attention.py:743 attention_sub_quad in the MMDiT, :762-765 "
                         "attention_basic in CLIP and T5, comfy/ldm/modules/diffusionmodules/model.py:327-337 "
                         "normal_attention (slice_attention) in the VAE"),
    "t5_activation": ("gelu_tanh", C + "comfy/text_encoders/t5.py:18 gelu_pytorch_tanh (t5_config_xxl.json)"),
    "t5_absent": (None, C + "comfy/text_encoders/sd3_clip.py:138-143 T5 runs when present; without it the CLIP rows "
                  "alone (none; the ComfyUI side does not run such a model yet)"),
    "clip_pool": ("first_eos", C + "comfy/clip_model.py:189 the first position equal to eos_token_id"),
    "clip_l_pooled_projected": (False, C + "comfy/text_encoders/sd3_clip.py:56 return_projected_pooled=False"),
    "single_file_clip_l_projection": ("file", C + "comfy/clip_model.py:198 text_projection loaded from the file"),
    "encoder_dtype": ("float32", C + "comfy/sd.py:239 set_model_compute_dtype(torch.float32); comfy/sd1_clip.py:213"),
    "text_encoder_storage": ("float16", C + "comfy/model_management.py:996 text_encoder_dtype: float16 on the CPU "
                             "unless --fp32-text-enc (weights cast per op by comfy.ops.manual_cast)"),
    "empty_encoder_text": ("empty", C + "comfy_extras/nodes_sd3.py:86-98 CLIPTextEncodeSD3 tokenizes each text as "
                           "given: an empty one is the empty prompt (empty_padding empty_prompt) or no tokens (none)"),
    "attention_order": ("context_first", C + "comfy/ldm/modules/diffusionmodules/mmdit.py:621 cat((context, x))"),
    "qkv_fusion": ("fused", C + "comfy/ldm/modules/diffusionmodules/mmdit.py SelfAttention.qkv one Linear"),
    "qk_norm_form": ("fused", C + "comfy/ldm/modules/diffusionmodules/mmdit.py:345-346 RMSNorm -> "
                     "comfy/ldm/common_dit.py rms_norm: torch.nn.functional.rms_norm, the weight cast to the input "
                     "dtype; on the CPU in float32 equal to native (bitwise, every float32 test), on CUDA one kernel: "
                     "native diverged from ComfyUI there (H200, torch 2.11: 9.5e-7 in float32, 0.016 in bfloat16; "
                     "fused not yet run on CUDA)"),
    "casts": ("sai", C + "comfy/ldm/modules/diffusionmodules/mmdit.py, from the SD3.5 code"),
    "modulate": ("addcmul", C + "comfy/ldm/modules/diffusionmodules/mmdit.py:109-112 "
                 "torch.addcmul(shift, x, 1 + scale)"),
    "vae_attention": ("conv", C + "comfy/ldm/modules/diffusionmodules/model.py AttnBlock: 1x1 Conv2d q, k, v"),
    "sampler": ("sai_euler", "ComfyUI's sd3.5_simple_example.json KSampler 'euler' (comfy/k_diffusion/sampling.py "
                "sample_euler on the x0 prediction)"),
    "schedule": ("sgm_uniform", "ComfyUI's sd3.5_simple_example.json scheduler; " + C +
                 "comfy/samplers.py:431-453 normal_scheduler(sgm=True) ('normal' is the sai value)"),
    "cfg_batch": ("uncond_first", C + "comfy/samplers.py calc_cond_batch: the uncond entry first in the batch"),
    "cfg_space": ("x0", C + "comfy/samplers.py:358 uncond_pred + (cond_pred - uncond_pred) * cond_scale on x0"),
    "cfg_lengths": ("split", C + "comfy/model_base.py:739 SD3's context is a CONDRegular, concatenated only at equal "
                    "shapes (comfy/conds.py:36-42); comfy/samplers.py:250-260 runs the cond call first"),
    "cfg_always": (False, C + "comfy/samplers.py:370 no uncond branch at cfg 1 (cfg_skip)"),
    "cfg_skip": ("one", C + "comfy/samplers.py:370 the uncond branch is left out only when math.isclose(cfg, 1.0)"),
    "timestep_dtype": ("float32", C + "comfy/model_base.py apply_model: the float32 sigma's timestep"),
    "latent_dtype": ("model", C + "comfy/samplers.py: the float32 latent throughout (float32 runs)"),
    "cond_dtype": ("model", C + "comfy/model_base.py apply_model: context cast to the model dtype"),
    "noise": ("diffusers", C + "comfy/sample.py:11 randn(latent.size(), float32, generator=manual_seed(seed)) on "
              "the CPU: the same draw as diffusers' randn_tensor in float32"),
    "slg": ("comfyui", C + "comfy_extras/nodes_sd3.py:176-179 SkipLayerGuidanceSD3 defaults: scale 3.0, start 0.01, "
            "end 0.15; comfy_extras/nodes_slg.py:43-75 active while percent_to_sigma(0.15) <= sigma <= "
            "percent_to_sigma(0.01), added to the x0 result after CFG"),
    "img2img": ("comfyui", C + "comfy/ldm/models/autoencoder.py:15-29 DiagonalGaussianRegularizer(sample=False): "
                "the posterior's mean; comfy/samplers.py:1147-1157 set_steps: the last N sigmas of a schedule of "
                "int(N / denoise) steps; comfy/model_sampling.py:70-72 noise_scaling in float32; the image as "
                "LoadImage / VAEEncode lay it out (channels-last view)"),
    "shift": ("comfyui", C + "comfy/supported_models.py:542 SD3 sampling_settings shift 3.0 for every family, "
              "whatever the files (scheduler_config agrees on the released diffusers folders)"),
    "autocast": ("off", C + "the CPU runs every op in the module dtype"),
    "half_compute": ("float32", C + "comfy/model_management.py:926-948 unet_manual_cast: on the CPU neither float16 "
                     "nor bfloat16 counts as supported, so half-precision weights are cast per op to float32 "
                     "(comfy.ops.manual_cast); the VAE's dtype is float32 there (vae_dtype)"),
    "fp8_weight_layout": ("column_major", C + "comfy/ops.py:268 cast_bias_weight keeps a quantized weight "
                          "whose dtype is already the input's; F.linear's transpose stays quantized (comfy-kitchen "
                          "0.2.40 tensor/fp8.py shape handlers) and addmm dequantizes it into a contiguous W^T "
                          "(tensor/base.py dequantize_args)"),
    "uint8": ("truncate", C + "nodes.py:1664 SaveImage np.clip(255 * x, 0, 255).astype(np.uint8)"),
}
FLAGS = tuple(replace(f, comfyui=COMFYUI[f.name][0], comfyui_provenance=COMFYUI[f.name][1]) for f in FLAGS)
BY_NAME = {f.name: f for f in FLAGS}
PROFILES = ("diffusers", "sai", "comfyui")


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
    """The image-side flag values as impl arguments (the shift rule is applied per model: ``sai_config_shift``)."""
    import torch

    from impl.mmdit import MMDiTOptions
    from impl.sampling import Form

    half = {"float16": torch.float16}
    plain = {"schedule": {"diffusers": "linspace_f64", "sai": "linspace_f32", "sgm_uniform": "sgm_uniform",
                          "simple": "simple"},
             "sampler": {"diffusers_euler": "euler_velocity", "sai_euler": "euler_x0", "sai_dpmpp_2m": "dpmpp_2m"},
             "slg": SLG_SCALES, "noise": {"diffusers": "model_dtype", "sai": "fp32_to_fp16"},
             "img2img": {"diffusers": "scale_noise", "sai": "noise_scaling", "comfyui": "mean"},
             "casts": {"diffusers": "cast_back", "sai": "promote"}}
    v = {k: table[values[k]] for k, table in plain.items()}
    form = Form(schedule=v["schedule"], update=v["sampler"], cfg_batch=values["cfg_batch"],
                cfg_space=values["cfg_space"], cfg_always=values["cfg_always"],
                timestep_dtype=half.get(values["timestep_dtype"], torch.float32),
                latent_dtype=half.get(values["latent_dtype"]), cond_dtype=half.get(values["cond_dtype"]),
                slg_scale=v["slg"], slg_window="sigma" if values["slg"] == "comfyui" else "steps", noise=v["noise"],
                img2img=v["img2img"], cfg_lengths=values["cfg_lengths"], cfg_skip=values["cfg_skip"])
    sub_quad = values["attention_kernel"] == "sub_quad"
    return {"mmdit": MMDiTOptions(attention_order=values["attention_order"], qkv=values["qkv_fusion"],
                                  qk_norm=values["qk_norm_form"], casts=v["casts"], modulate=values["modulate"],
                                  attention="sub_quadratic" if sub_quad else "sdpa"),
            "vae_attention": "conv_sliced" if sub_quad and values["vae_attention"] == "conv" else values["vae_attention"],
            "form": form, "uint8": values["uint8"],
            "autocast": values["autocast"] == "cuda_fp16", "half_compute": values["half_compute"],
            "slg_window": SLG_WINDOWS[values["slg"]], "fp8_weight_layout": values["fp8_weight_layout"]}


def sai_config_shift(label: str) -> float:
    """sd3_infer's CONFIGS: shift 1.0 for SD3-Medium, 3.0 for the others (the ``shift`` flag's ``sai_config``)."""
    return 1.0 if "sd3-medium" in label.removeprefix("embedded-").split("/") else 3.0


def settings(values: dict[str, Any]):
    """The text flags as ``impl.text.TextSettings``."""
    import torch

    from impl.text import TextSettings

    return TextSettings(
        clip_l_mode=values["clip_l_tokenizer"], clip_g_mode=values["clip_g_tokenizer"],
        clip_l_pad=values["clip_l_pad"], clip_g_pad=values["clip_g_pad"], split=values["prompt_split"],
        weights=values["prompt_weights"], chunks=values["clip_chunks"], t5_mode="hf",
        t5_length_rule={"max_length": "max_length", "sai": "chars226_min77", "min77": "min77"}[values["t5_length_rule"]],
        t5_max_length=values["t5_max_length"],
        t5_mask=values["t5_mask"], t5_absent=values["t5_absent"],
        t5_attention="matmul" if values["attention_kernel"] == "sub_quad" else values["t5_attention"],
        clip_attention="matmul" if values["attention_kernel"] == "sub_quad" else "sdpa",
        t5_activation=values["t5_activation"], t5_absent_length=values["t5_max_length"],
        clip_pool=values["clip_pool"], clip_l_pooled_projected=values["clip_l_pooled_projected"],
        encoder_dtype=torch.float32 if values["encoder_dtype"] == "float32" else None,
        weight_storage=torch.float16 if values["text_encoder_storage"] == "float16" else None,
        empty_encoder_text=values["empty_encoder_text"],
    )


def catalogue() -> str:
    """The quirk catalogue in Markdown: every flag with both references' values, what it changes and where each
    value comes from. ``QUIRKS.md`` is this text (a test keeps it in step)."""
    lines = ["# Quirk catalogue", "",
             "Every known difference between the references that changes numbers is a named flag of `sd3parity`.",
             "A profile is a set of flag values: `diffusers` (diffusers + transformers), `sai` (the Stability-AI",
             "SD3.5 code) and `comfyui` (ComfyUI's own nodes). Set one flag with `--flag NAME=VALUE`. Generated by",
             "`sd3parity flags --markdown` from",
             "`parity/flags.py`. The id groups related quirks: T text, C conditioning, G guidance, S schedule and",
             "sampler, N numerics, M MMDiT, V VAE.", ""]
    for side, title in (("text", "Text side"), ("image", "Image side")):
        lines += [f"## {title}", "", "| flag | id | diffusers | sai | comfyui | choices | changes |",
                  "|---|---|---|---|---|---|---|"]
        for f in FLAGS:
            if f.side == side:
                lines.append(f"| `{f.name}` | {f.quirk} | `{f.diffusers}` | `{f.sai}` | `{f.comfyui}` | "
                             f"{', '.join(f'`{c}`' for c in f.choices)} | {f.changes} |")
        lines.append("")
    lines += ["## Provenance", ""]
    lines += [f"- `{f.name}`: {f.provenance}; comfyui: {f.comfyui_provenance}." for f in FLAGS]
    return "\n".join(lines) + "\n"
