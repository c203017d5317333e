"""The comfyui profile against ComfyUI's own loaders and nodes, from the checkout at ``$SD3PARITY_COMFYUI`` or
``../shared/references/ComfyUI``. The tests that run ComfyUI are skipped without one; the rest (the side's checks
of its input, impl's ComfyUI behaviours on their own) run everywhere."""
import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from impl import sai_tokenize as T
from parity import flags as F
from parity.cli import main
from parity.run import Spec, check

COMFYUI = os.environ.get("SD3PARITY_COMFYUI") or str(ROOT.parent / "shared" / "references" / "ComfyUI")
needs_comfyui = pytest.mark.skipif(not (Path(COMFYUI) / "comfy" / "sd.py").is_file(),
                                   reason=f"no ComfyUI at {COMFYUI} (set SD3PARITY_COMFYUI)")
# another ComfyUI version kept beside the reference one (README: ComfyUI versions); its tests skip without it
OTHER = os.environ.get("SD3PARITY_COMFYUI_OTHER")
needs_other = pytest.mark.skipif(not (OTHER and (Path(OTHER) / "comfy" / "sd.py").is_file()),
                                 reason="no second ComfyUI checkout (set SD3PARITY_COMFYUI_OTHER)")
WEIGHTED = "(masterpiece:1.2), a (red) cat, ((blue eyes))"
STRADDLE = " ".join(["cat"] * 74) + " photorealistic"  # a 3-token word across the chunk boundary (QUIRKS T3)
# 470 characters, 2 CLIP chunks, weights, T5 longer than the negative's: every ComfyUI-only text path at once
LONG = ("a (very:1.3) detailed photograph of a small tabby cat sitting on a wooden windowsill in the warm afternoon "
        "light, with (soft bokeh:0.8) in the background, dust motes floating in the air, a potted plant beside it, "
        "the city skyline far away, shot on a 50mm lens at f1.8, film grain, muted colours, cinematic composition, "
        "award winning, highly detailed fur, whiskers catching the light, embedding:foo and more words to pass the "
        "limit of seventy five tokens easily")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("comfyui") / "in.png"
    Image.fromarray((np.arange(64 * 64 * 3).reshape(64, 64, 3) * 37 % 256).astype(np.uint8)).save(path)
    return str(path)


def with_image(options: dict, image: str) -> dict:
    return {**options, "image": image} if options.get("image") else options


def comfy(cache=None, **options):
    flags = options.pop("flags", {})
    options.setdefault("prompts", (WEIGHTED,))
    return check(Spec(profile="comfyui", comfyui=COMFYUI, overrides=tuple(sorted(flags.items())), **options), cache)


@needs_comfyui
@pytest.mark.parametrize("options", [
    {"prompts": ("a photo of a cat", "wow!! amazing! so cool!!!", WEIGHTED)},  # sgm_uniform, euler: the template's
    {"flags": {"sampler": "sai_dpmpp_2m", "schedule": "sai"}, "steps": 4, "families": ("sd3.5-medium",)},  # normal
    {"flags": {"schedule": "simple"}, "steps": 5, "guidance": 1.0, "families": ("sd3-medium",)},  # no uncond call
    {"guidance": 0.5, "steps": 3, "families": ("sd3-medium",)},  # CFG below 1 (only cfg 1 leaves uncond out)
    {"prompts": (LONG,), "families": ("sd3.5-large",)},  # cond and uncond in two calls
    {"dtype": "bfloat16", "families": ("sd3.5-medium",)},  # half-precision weights computed in float32 on the CPU
    {"families": ("sd3.5-medium",), "slg": (1,), "steps": 8},  # SkipLayerGuidanceSD3: a skip call at step 1
    {"families": ("sd3.5-large",), "image": True, "steps": 4},  # LoadImage, VAEEncode, denoise 0.6: steps 2-5 of 6
    {"dtype": "float16", "families": ("sd3.5-large",), "prompts": ("a photo of a cat",)},
    {"families": ("sd3.5-medium",), "steps": 6, "negative_zero": 0.1},  # the older SD3 workflows' negative
    {"families": ("sd3-medium",), "steps": 3, "negative_zero": 0.0},  # ConditioningZeroOut throughout
    {"families": ("sd3.5-medium",), "steps": 4, "empty_padding": "none"},  # CLIPTextEncodeSD3: T5's end token
    {"families": ("sd3-medium",), "steps": 6, "empty_padding": "none", "negative_zero": 0.1},
], ids=["default", "dpmpp_2m-normal", "simple-cfg1", "cfg-below-1", "long-prompt", "bfloat16", "slg", "img2img",
        "float16", "negative-zeroed-from-0.1", "negative-zeroed", "negative-unpadded", "negative-unpadded-zeroed"])
def test_comfyui_profile_is_bitwise_equal_to_comfyui(options, ref_cache, image):
    report = comfy(ref_cache, **with_image(options, image))
    assert report.first_divergence is None and not report.failures
    components = {r["component"] for r in report.records}
    assert {"clip-l", "clip-g", "t5", "conditioning"} <= components
    if not options.get("text_only"):
        assert {"mmdit", "sampler", "vae"} <= components
    source = report.sources["comfyui"]["comfyui"]
    assert source["sha256"] and source["path"] == COMFYUI


# CLIPTextEncodeSD3 on the positive: CLIP-L's, CLIP-G's and T5's texts, its empty_padding, the ids each encoder
# must receive from that node (77 per sequence; T5's at least 77 long) and the context's length: CLIP-G's one chunk
# is padded with its empty chunk to CLIP-L's two, and a weighted text adds the empty sequence to its encoder's batch
SD3_TEXTS = [
    ((STRADDLE, "a (red:1.2) dog", "a bird"), "empty_prompt", {"clip-l": 2 * 77, "clip-g": 3 * 77, "t5": 77},
     2 * 77 + 77),
    (("a cat", "", "a bird"), "empty_prompt", {"clip-l": 77, "clip-g": 77, "t5": 77}, 77 + 77),  # "": the empty prompt
    (("", "a dog", "a bird"), "none", {"clip-l": 77, "clip-g": 77, "t5": 77}, 77 + 77),  # no tokens, padded to 1 chunk
    (("", "", "a (bird:1.2)"), "none", {"t5": 2 * 77}, 77),  # no CLIP rows, a zero pooled vector
    (("a cat", "a dog", ""), "none", {"clip-l": 77, "clip-g": 77, "t5": 1}, 77 + 1),  # T5's end token alone
]


@needs_comfyui
@pytest.mark.parametrize("texts, padding, ids, length", SD3_TEXTS, ids=["chunks-padded", "empty-clip-g",
                                                                         "unpadded-clip-l", "t5-only", "empty-t5"])
def test_per_encoder_texts_are_comfyuis_clip_text_encode_sd3(texts, padding, ids, length, ref_cache):
    report = comfy(ref_cache, prompts=(texts,), empty_padding=padding, families=("sd3.5-large",))
    assert report.first_divergence is None and not report.failures
    got = {r["component"]: r["shape"][0] for r in report.records if r["layer"] == "input_ids"}
    assert got == ids  # what CLIPTextEncode would not give: the node's own tokens reached both sides
    contexts = {r["prompt"]: r["shape"][1] for r in report.records if r["layer"] == "context"}
    assert contexts == {0: length}
    assert {"mmdit", "sampler", "vae"} <= {r["component"] for r in report.records}


@needs_comfyui
def test_teacher_forcing_follows_comfyuis_separate_cfg_calls(ref_cache):
    """A context of another length than the negative's (an unpadded T5-only prompt against the unpadded empty
    negative): ComfyUI calls cond and uncond apart, and so does impl on ComfyUI's inputs, each unit bitwise (the
    T5-only conditioning too)."""
    report = comfy(ref_cache, prompts=(("", "", "a (bird:1.2)"),), empty_padding="none", families=("sd3.5-medium",),
                   mode="both")
    assert report.records and not report.failures
    assert all(r["local"]["bitwise_equal"] for r in report.records), [r["layer"] for r in report.records
                                                                      if not r.get("local", {}).get("bitwise_equal")]
    contexts = {r["branch"]: r["shape"][1] for r in report.records if r["layer"] == "input.context" and r["step"] == 0}
    assert contexts == {"cond": 77, "uncond": 1}
    finals = {(r["step"], r["branch"]) for r in report.records if r["component"] == "mmdit" and r["layer"] == "final"
              and r["local"]["bitwise_equal"]}
    assert finals == {(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")}


@needs_other
@pytest.mark.parametrize("options", [
    {"prompts": ("a photo of a cat", WEIGHTED, LONG)},
    {"dtype": "bfloat16", "families": ("sd3.5-medium",), "slg": (1,), "steps": 8},
    {"flags": {"sampler": "sai_dpmpp_2m", "schedule": "simple"}, "families": ("sd3.5-large",), "image": True,
     "steps": 4},
    {"families": ("sd3-medium",), "steps": 6, "negative_zero": 0.1},
], ids=["families", "bfloat16-slg", "dpmpp_2m-img2img", "negative-zero"])
def test_another_comfyui_version_is_bitwise_equal(options, image):
    options = with_image(options, image)
    flags = options.pop("flags", {})
    report = check(Spec(profile="comfyui", comfyui=OTHER, overrides=tuple(sorted(flags.items())), **options))
    assert report.first_divergence is None and not report.failures
    assert report.sources["comfyui"]["comfyui"]["path"] == OTHER


@needs_other
def test_another_comfyui_version_names_what_it_computes_otherwise(fp8_file, capsys):
    """A scaled-fp8 file against a ComfyUI from before comfy/quant_ops.py: refused, the difference named; a newer
    one must be bitwise."""
    from parity.embedded import model_dir

    code = main(["check", "--profile", "comfyui", "--comfyui", OTHER, "--checkpoint", fp8_file, "--model",
                 str(model_dir("sd3.5-medium")), "--prompt", "a cat", "--quiet"])
    err = capsys.readouterr().err
    if (Path(OTHER) / "comfy" / "quant_ops.py").is_file():
        assert code == 0
    else:
        assert code == 3 and "biases stored in float8" in err and "Traceback" not in err


@needs_comfyui
def test_long_prompts_take_comfyuis_paths(ref_cache):
    """Two CLIP chunks (154 rows), T5 uncut (over 226 characters), and the two CFG branches in separate calls."""
    report = comfy(ref_cache, prompts=(LONG,), families=("sd3.5-large",))
    context = next(r for r in report.records if r["layer"] == "context")
    t5 = next(r for r in report.records if r["component"] == "t5" and r["layer"] == "final_layer_norm")
    assert len(LONG) > 226 and context["shape"][1] == 2 * 77 + t5["shape"][1] and t5["shape"][1] > 77
    inputs = [r for r in report.records if r["layer"] == "input.context" and r["step"] == 0]
    assert sorted((r["branch"], r["shape"][1]) for r in inputs) == [("cond", context["shape"][1]), ("uncond", 154)]


@needs_comfyui
@pytest.mark.parametrize("flag, options, first", [
    ("prompt_split=words", {"prompts": (STRADDLE,)}, ("clip-l", "input_ids", None)),  # the word moves to chunk 1
    ("prompt_weights=discard", {}, ("clip-l", "input_ids", None)),  # no empty sequence in the batch
    ("clip_chunks=first", {"prompts": (LONG,)}, ("clip-l", "input_ids", None)),
    ("t5_length_rule=sai", {"prompts": (LONG,)}, ("t5", "input_ids", None)),  # cut at 226 characters
    ("text_encoder_storage=as_loaded", {}, ("clip-l", "weight:text_model.embeddings.token_embedding.weight", None)),
    ("t5_activation=gelu_new", {}, ("t5", "block.0.layer.1.DenseReluDense.wo", None)),
    ("modulate=mul_add", {}, ("mmdit", "block.0.context.attn.q", 0)),  # the first modulated input's projection
    ("attention_order=image_first", {}, ("mmdit", "block.0.context.attn.proj", 0)),
    ("uint8=round", {}, ("vae", "image_uint8", None)),
    ("half_compute=native", {"dtype": "bfloat16"}, ("sampler", "input.latent_in", 0)),  # impl's bfloat16 latent
    ("slg=sai", {"slg": (1,), "steps": 8}, ("sampler", "x0", 1)),  # scale 2.5 instead of the node's 3.0
    ("img2img=sai", {"image": True, "steps": 4}, ("vae", "encoder.conv_in", None)),  # a contiguous image
    ("cfg_skip=at_most_one", {"guidance": 0.5}, ("sampler", "input.latent_in", 0)),  # ComfyUI's uncond at cfg 0.5
])
def test_comfyui_flag_flips_against_comfyui(flag, options, first, ref_cache, image):
    name, value = F.parse_override(flag)
    options = with_image({"families": ("sd3.5-medium",), **options}, image)
    report = comfy(ref_cache, flags={name: value}, **options)
    fd = report.first_divergence
    assert fd is not None and (fd["component"], fd["layer"], fd.get("step")) == first
    assert comfy(ref_cache, **options).first_divergence is None  # the flag, not the settings


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory):
    """The embedded SD3.5-Medium single file with its MMDiT in ComfyUI's scaled-fp8 layout (sd3parity convert)."""
    from parity.embedded import single_file

    dst = tmp_path_factory.mktemp("fp8") / "sd3.5-medium-fp8.safetensors"
    assert main(["convert", "--fp8-scaled", str(single_file("sd3.5-medium")), str(dst)]) == 0
    return str(dst)


@needs_comfyui
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scaled_fp8_file_is_bitwise_equal_to_comfyui(dtype, fp8_file, ref_cache):
    """ComfyUI's load_checkpoint_guess_config reads the scaled layout; impl dequantizes in float32 (the CPU's
    compute dtype) and multiplies by W^T laid out as ComfyUI's dequantized transpose is (fp8_weight_layout)."""
    from parity.embedded import model_dir

    options = {"checkpoint": fp8_file, "model": str(model_dir("sd3.5-medium")), "dtype": dtype,
               "prompts": ("a photo of a cat",)}
    report = comfy(ref_cache, **options)
    assert report.first_divergence is None and not report.failures
    assert {"mmdit", "sampler", "vae"} <= {r["component"] for r in report.records}
    assert any("scaled-fp8 MMDiT" in n for n in report.notes)
    # the flag reaches impl: a row-major weight changes the first scaled layer's product
    fd = comfy(ref_cache, flags={"fp8_weight_layout": "row_major"}, **options).first_divergence
    assert fd is not None and (fd["component"], fd["layer"], fd.get("step")) == ("mmdit", "t_embedder", 0)


@needs_comfyui
@pytest.mark.parametrize("scaled", [False, True], ids=["t5xxl_fp8_e4m3fn", "t5xxl_fp8_e4m3fn_scaled"])
def test_float8_t5_file_is_bitwise_equal_to_comfyui(scaled, model_dir, tmp_path):
    """A T5 file as ComfyUI's t5xxl_fp8_e4m3fn is (linear weights in float8_e4m3fn, the rest float16), unscaled:
    both read the float8 values exactly; or scaled (a float32 scale per weight, the scaled_fp8 marker): ComfyUI
    dequantizes in float32 at each op, impl at load, and float16 storage does not round those weights."""
    import shutil

    from safetensors.torch import save_file

    from impl.weights import read_safetensors

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    path = d / "text_encoder_3" / "model.safetensors"
    state = read_safetensors(path)
    linear = {k for k, v in state.items()
              if v.ndim == 2 and (".DenseReluDense." in k or ".SelfAttention." in k) and "relative_attention" not in k}
    out = {k: v.to(torch.float16) for k, v in state.items() if k not in linear}
    for k in linear:
        scale = state[k].abs().max() / 448 if scaled else torch.tensor(1.0)
        out[k] = (state[k] / scale).to(torch.float8_e4m3fn)
        if scaled:
            out[k[:-len("weight")] + "scale_weight"] = scale.float()
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, path)
    report = check(Spec(profile="comfyui", comfyui=COMFYUI, model=str(d), text_only=True, prompts=(WEIGHTED,)))
    assert report.first_divergence is None and not report.failures
    assert any(r["component"] == "t5" for r in report.records) and len(linear) >= 6


@needs_comfyui
def test_scaled_fp8_single_file_with_its_text_encoders(tmp_path, ref_cache):
    """sd3parity convert --fp8-scaled of a single file that holds its text encoders: the MMDiT's and T5's linear
    weights scaled, read by CheckpointLoaderSimple's path and by impl."""
    from parity.convert import diffusers_to_sai_file
    from parity.embedded import model_dir

    full, scaled = tmp_path / "m.safetensors", tmp_path / "m-fp8.safetensors"
    diffusers_to_sai_file(model_dir("sd3.5-medium"), full)
    assert main(["convert", "--fp8-scaled", str(full), str(scaled)]) == 0
    report = comfy(ref_cache, checkpoint=str(scaled), prompts=("a photo of a cat",))
    assert report.first_divergence is None and not report.failures
    assert {"t5", "mmdit", "vae"} <= {r["component"] for r in report.records}


@pytest.mark.parametrize("option, step", [(["--negative-zero", "0.1"], 1), (["--empty-padding", "none"], 0)])
def test_negative_options_reach_impl(option, step, tmp_path, capsys):
    """impl's own records with and without the option part at the negative's context: --negative-zero 0.1 (8 steps,
    shift 3: sigma 1.0 at step 0 lies above percent_to_sigma(0.1) = 0.964, the rest below) at step 1, where it
    becomes zeros; --empty-padding none at step 0, one T5 row instead of 154."""
    dumps = []
    for extra in ([], option):
        dumps.append(tmp_path / f"d{len(dumps)}")
        assert main(["dump", "--profile", "comfyui", "--family", "sd3.5-medium", "--prompt", "a cat", "--steps", "8",
                     "--out", str(dumps[-1]), *extra]) == 0
    capsys.readouterr()
    assert main(["compare-dumps", str(dumps[1]), str(dumps[0]), "--json", "--strict"]) == 1
    import json

    fd = json.loads(capsys.readouterr().out)["first_divergence"]
    assert (fd["component"], fd["layer"], fd["step"], fd["branch"]) == ("sampler", "input.context", step, "uncond")


def test_negative_at_follows_comfyuis_timestep_ranges():
    from impl import sampling

    form = sampling.Form(schedule="sgm_uniform", update="euler_x0", cfg_space="x0")
    s = sampling.SamplerSettings(steps=8, shift=3.0, negative_zero=0.1, form=form)
    neg = sampling.Conditioning(torch.ones(1, 3, 4), torch.ones(1, 2))
    bound = sampling.percent_sigma(3.0, 0.1)
    assert abs(bound - 2.7 / 2.8) < 1e-15
    for sigma in sampling.sigmas(s)[:-1]:
        out = sampling.negative_at(s, sigma, neg)
        assert (out is neg) == (float(sigma) > bound) and (out is neg or not out.context.any() and not out.pooled.any())
    always = sampling.SamplerSettings(steps=8, negative_zero=0.0, form=form)
    assert not sampling.negative_at(always, torch.tensor(1.0), neg).context.any()
    with pytest.raises(ValueError, match="boundary"):
        sampling.negative_at(s, torch.tensor(bound, dtype=torch.float32), neg)


def test_negative_zero_is_comfyuis(capsys):
    assert main(["check", "--family", "sd3.5-medium", "--negative-zero", "0.1"]) == 2
    assert "the diffusers reference has no zeroed negative" in capsys.readouterr().err
    assert main(["check", "--family", "sd3.5-medium", "--empty-padding", "none"]) == 2
    assert "the diffusers reference pads the empty negative" in capsys.readouterr().err
    assert main(["check", "--profile", "comfyui", "--negative-zero", "1.5"]) == 2
    assert "in [0, 1)" in capsys.readouterr().err


@needs_comfyui
def test_cfg_lengths_concat_cannot_batch_unequal_contexts(capsys):
    code = main(["check", "--profile", "comfyui", "--comfyui", COMFYUI, "--prompt", LONG, "--family", "sd3-medium",
                 "--flag", "cfg_lengths=concat"])
    assert code == 2 and "cfg_lengths=split" in capsys.readouterr().err


@needs_comfyui
def test_explain_names_what_separates_diffusers_from_comfyui(capsys):
    import json

    code = main(["explain", "--text-only", "--prompt", "wow!! a (red:1.2) cat", "--between", "diffusers", "comfyui",
                 "--comfyui", COMFYUI, "--json"])
    assert code == 0
    found = {n for n, _ in json.loads(capsys.readouterr().out)["found"]}
    assert {"prompt_split", "prompt_weights", "text_encoder_storage", "t5_length_rule"} <= found


def test_comfyui_profile_without_a_checkout_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("SD3PARITY_COMFYUI", raising=False)
    assert main(["check", "--profile", "comfyui", "--prompt", "a cat", "--text-only"]) == 2
    assert "--comfyui" in capsys.readouterr().err


def test_comfyui_dir_must_be_a_checkout(tmp_path, capsys):
    (tmp_path / "nodes.py").write_text("")
    assert main(["check", "--profile", "comfyui", "--comfyui", str(tmp_path), "--text-only"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "comfy/sd.py" in err


@needs_comfyui
def test_single_file_with_its_text_encoders_is_bitwise_equal_to_comfyui(tmp_path, ref_cache):
    """An SAI single file holding its text encoders, as CheckpointLoaderSimple reads it (its CLIP output), with no
    configs beside it: ComfyUI's shift is its SD3 model config's 3.0 (shift=comfyui), not a scheduler file's."""
    from parity.convert import diffusers_to_sai_file
    from parity.embedded import model_dir

    path = tmp_path / "m.safetensors"
    diffusers_to_sai_file(model_dir("sd3.5-medium"), path)
    report = comfy(ref_cache, checkpoint=str(path))
    assert report.first_divergence is None and not report.failures
    assert {"clip-l", "clip-g", "t5", "mmdit", "vae"} <= {r["component"] for r in report.records}
    assert any(n.startswith(f"text encoders from {path}") for n in report.notes)
    fd = comfy(ref_cache, checkpoint=str(path), flags={"shift": "scheduler_config"}).first_divergence
    assert (fd["component"], fd["layer"]) == ("sampler", "sigmas")  # no scheduler_config.json: diffusers' 1.0


@needs_comfyui
def test_importing_comfyui_leaves_torch_as_it_was():
    """ComfyUI sets torch's fp16/bf16 SDPA reduction flag on import: the caller keeps its own."""
    from parity.sides import comfyui as C

    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    C.load(Path(COMFYUI))
    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() == before


TOKEN_PROMPTS = (WEIGHTED, LONG, STRADDLE, "a \\(literal\\) (b:0.5)(c)", "line\nbreak embedding:x y", "((a)) (b:1.5:2)",
                 "unclosed (paren", "wow!! amazing! so cool!!!", "")


@needs_comfyui
def test_chunks_and_weights_match_comfyuis_tokenizer(stack, model_dir):
    """impl's ids and weights of every chunk, against ComfyUI's own ``SD3Tokenizer.tokenize_with_weights``."""
    from impl.text import clip_chunks, t5_chunk
    from parity.sides import comfyui as C

    tokenize = C.tokenizer(Path(COMFYUI), model_dir)
    s = F.settings(F.profile_values("comfyui"))
    for prompt in TOKEN_PROMPTS:
        theirs = tokenize(prompt)
        assert clip_chunks(stack, prompt, s.clip_l_mode, s.clip_l_pad, s.split) == theirs["l"], prompt
        assert clip_chunks(stack, prompt, s.clip_g_mode, s.clip_g_pad, s.split) == theirs["g"], prompt
        assert [t5_chunk(stack, prompt, s)] == theirs["t5xxl"], prompt


@needs_comfyui
def test_tokens_command_compares_with_comfyui(capsys):
    assert main(["tokens", WEIGHTED, "--comfyui", COMFYUI]) == 0
    out = capsys.readouterr().out
    assert "ref  comfyui" in out and "= comfyui" in out and "weights @1: 1.2" in out


# ---------------------------------------------------------------------------------------------- impl alone

def test_segments_keep_weighted_segments_whole():
    """ComfyUI's pieces (comfy/sd1_clip.py tokenize_with_weights): a segment is cut only before ' embedding:'."""
    assert T.segments("a red cat, (blue eyes:1.3) x") == [("a red cat, ", 1.0), ("blue eyes", 1.3), (" x", 1.0)]
    assert T.segments("a cat embedding:foo bar") == [("a cat", 1.0), ("embedding:foo bar", 1.0)]
    assert T.words("a red cat, (blue eyes:1.3)") == [("a", 1.0), ("red", 1.0), ("cat,", 1.0), ("blue", 1.3),
                                                     ("eyes", 1.3)]


def test_weights_apply_to_weighted_tokens_only():
    from impl.text import weighted

    z = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # one section, then the empty sequence
    rows = [[(1, 1.0), (2, 2.0), (3, 1.0)], [(1, 1.0), (2, 1.0), (3, 1.0)]]
    out = weighted(z, rows, 1)
    assert torch.equal(out[0, [0, 2]], z[0, [0, 2]])
    assert torch.equal(out[0, 1], (z[0, 1] - z[1, 1]) * 2.0 + z[1, 1])


def test_encode_prompt_with_comfyuis_text_values(stack):
    """Weights add the empty sequence to each encoder's batch; all chunks reach the context."""
    from impl.text import clip_chunks, encode_prompt

    s = F.settings(F.profile_values("comfyui"))
    c = encode_prompt(stack, LONG, s)
    chunks = len(clip_chunks(stack, LONG, s.clip_l_mode, s.clip_l_pad, s.split))
    assert chunks == 2 and len(c.ids["clip-l"]) == (chunks + 1) * 77  # the chunks, then the empty sequence
    assert c.context.shape[1] == chunks * 77 + len(c.ids["t5"]) // 2  # T5: the prompt's row and the empty one


def test_schedules_of_comfyui():
    from impl.sampling import sai_schedule, simple_schedule

    sgm, normal = sai_schedule(20, 3.0, sgm=True), sai_schedule(20, 3.0)
    assert sgm.shape == normal.shape == (21,) and sgm[0] == normal[0] == 1.0 and sgm[-1] == normal[-1] == 0.0
    assert sgm[-2] > 5 * normal[-2]  # sgm_uniform drops the last of steps + 1 points: it stops far above sigma_min
    assert torch.equal(simple_schedule(1000, 1.0)[:-1], torch.arange(1000, 0, -1) / 1000 * 1000 / 1000)


# ---------------------------------------------------------------------------------------------- workflows

DATA = Path(__file__).parent / "data"


def test_workflow_formats_give_the_same_settings():
    """One workflow saved in ComfyUI's API format and in its UI format (tests/data, written for these tests)."""
    from parity.workflow import settings

    api, ui = settings(DATA / "workflow-api.json"), settings(DATA / "workflow-ui.json")
    assert {**api.__dict__, "notes": None} == {**ui.__dict__, "notes": None}
    assert (api.prompt, api.seed, api.steps, api.guidance, api.height, api.width, api.shift) == \
        ("a (red:1.2) fox in the snow", 7, 3, 4.01, 48, 64, 2.5)
    assert api.flags == {"sampler": "sai_dpmpp_2m", "schedule": "simple"}


def test_the_sd35_template_is_read():
    """ComfyUI's own SD3.5 template (package comfyui-workflow-templates-json): the profile's defaults follow it."""
    from importlib.resources import files

    from parity.workflow import settings

    pytest.importorskip("comfyui_workflow_templates_json")
    w = settings(files("comfyui_workflow_templates_json") / "templates" / "sd3.5_simple_example.json")
    assert (w.steps, w.guidance, w.height, w.width, w.shift, w.strength) == (20, 4.01, 1024, 1024, None, None)
    comfyui = F.profile_values("comfyui")
    assert w.flags == {"sampler": comfyui["sampler"], "schedule": comfyui["schedule"]}


@needs_comfyui
def test_check_takes_a_workflows_settings(capsys):
    import json

    code = main(["check", "--profile", "comfyui", "--comfyui", COMFYUI, "--family", "sd3.5-medium", "--workflow",
                 str(DATA / "workflow-ui.json"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["first_divergence"] is None
    steps = {r["step"] for r in out["records"] if r["component"] == "sampler" and r["layer"] == "x0"}
    image = next(r for r in out["records"] if r["layer"] == "image_uint8")
    assert steps == {0, 1, 2} and image["shape"] == [48, 64, 3]
    assert any("workflow-ui.json" in n for n in out["notes"])


def zero_out(w: dict, start: float | None = None) -> dict:
    """The API workflow with its negative zeroed: ConditioningZeroOut of the empty prompt, or (``start``) the
    empty prompt on the timestep range (0, start) combined with its zeros on (start, 1)."""
    w["41"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["40", 0]}}
    if start is None:
        w["3"]["inputs"]["negative"] = ["41", 0]
        return w
    w["42"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["40", 0], "start": 0.0,
                                                                         "end": start}}
    w["43"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["41", 0], "start": start,
                                                                         "end": 1.0}}
    w["44"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["42", 0],
                                                                "conditioning_2": ["43", 0]}}
    w["3"]["inputs"]["negative"] = ["44", 0]
    return w


@pytest.mark.parametrize("padding", ["none", "empty_prompt"])
def test_clip_text_encode_sd3_negatives_are_read(tmp_path, capsys, padding):
    import json

    from parity.workflow import settings

    w = json.loads((DATA / "workflow-api.json").read_text())
    w["40"] = {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip_l": "", "clip_g": "", "t5xxl": "",
                                                              "empty_padding": padding, "clip": ["4", 1]}}
    path = tmp_path / "w.json"
    path.write_text(json.dumps(zero_out(w, 0.1)))
    assert (settings(path).empty_padding, settings(path).negative_zero) == (padding, 0.1)
    w["40"]["inputs"]["t5xxl"] = "blurry"
    path.write_text(json.dumps(w))
    assert main(["check", "--profile", "comfyui", "--workflow", str(path)]) == 3
    assert "has the texts ['', '', 'blurry']" in capsys.readouterr().err


def sd3_positive(fmt: str, texts: tuple, padding: str) -> dict:
    """The test workflow (API or UI format) with its positive a CLIPTextEncodeSD3 node of these texts."""
    import json

    w = json.loads((DATA / f"workflow-{fmt}.json").read_text())
    if fmt == "api":
        w["16"] = {"class_type": "CLIPTextEncodeSD3", "inputs": {**dict(zip(("clip_l", "clip_g", "t5xxl"), texts)),
                                                                  "empty_padding": padding, "clip": ["4", 1]}}
    else:
        node = next(n for n in w["nodes"] if n["id"] == 16)
        node.update(type="CLIPTextEncodeSD3", widgets_values=[*texts, padding])
    return w


@needs_comfyui
@pytest.mark.parametrize("fmt", ["api", "ui"])
def test_clip_text_encode_sd3_positives_are_read(fmt, tmp_path, capsys):
    import json

    from parity.workflow import settings

    path = tmp_path / "w.json"
    path.write_text(json.dumps(sd3_positive(fmt, ("a fox", "", "a red fox in the snow"), "empty_prompt")))
    assert (settings(path).prompt, settings(path).empty_padding) == (("a fox", "", "a red fox in the snow"),
                                                                     "empty_prompt")
    code = main(["check", "--profile", "comfyui", "--comfyui", COMFYUI, "--family", "sd3.5-medium", "--workflow",
                 str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["first_divergence"] is None
    assert out["prompts"] == [["a fox", "", "a red fox in the snow"]]
    path.write_text(json.dumps(sd3_positive(fmt, ("a fox",) * 3, "none")))  # CLIPTextEncode's, whatever the padding
    assert (settings(path).prompt, settings(path).empty_padding) == ("a fox", "empty_prompt")
    # one empty CLIP text is padded to the other's chunks with its empty prompt whatever the padding: the
    # CLIPTextEncode negative's rule runs it
    path.write_text(json.dumps(sd3_positive(fmt, ("", "a fox", "a fox"), "none")))
    assert (settings(path).prompt, settings(path).empty_padding) == (("", "a fox", "a fox"), "empty_prompt")


def test_positive_and_negative_padding_empty_texts_differently_are_refused(tmp_path, capsys):
    import json

    path = tmp_path / "w.json"
    path.write_text(json.dumps(sd3_positive("api", ("a fox", "a fox", ""), "none")))  # the negative: CLIPTextEncode
    assert main(["check", "--profile", "comfyui", "--workflow", str(path)]) == 3
    assert "pad empty texts differently (['empty_prompt', 'none']" in capsys.readouterr().err


@pytest.mark.parametrize("start, expected", [(None, 0.0), (0.1, 0.1)])
def test_zeroed_negatives_are_read(tmp_path, start, expected):
    import json

    from parity.workflow import settings

    path = tmp_path / "w.json"
    path.write_text(json.dumps(zero_out(json.loads((DATA / "workflow-api.json").read_text()), start)))
    assert settings(path).negative_zero == expected
    assert settings(DATA / "workflow-api.json").negative_zero is None


@pytest.mark.parametrize("edit, code, message", [
    (lambda w: w["40"]["inputs"].update(text="blurry"), 3, "negative prompt 'blurry'"),
    (lambda w: zero_out(w) and w["40"]["inputs"].update(text="blurry"), 3, "'blurry' (under ConditioningZeroOut)"),
    (lambda w: zero_out(w, 0.1) and w["43"]["inputs"].update(end=0.9), 3, "timestep ranges"),
    (lambda w: zero_out(w, 0.1) and w["42"].update(class_type="ConditioningZeroOut"), 3, "combines"),
    (lambda w: w["3"]["inputs"].update(sampler_name="dpmpp_sde"), 3, "'dpmpp_sde'"),
    (lambda w: w.pop("3"), 3, "0 KSampler nodes"),
])
def test_workflows_the_harness_cannot_run_are_refused(tmp_path, capsys, edit, code, message):
    import json

    w = json.loads((DATA / "workflow-api.json").read_text())
    edit(w)
    (tmp_path / "w.json").write_text(json.dumps(w))
    assert main(["check", "--profile", "comfyui", "--workflow", str(tmp_path / "w.json")]) == code
    assert message in capsys.readouterr().err


def test_a_broken_workflow_file_is_named(tmp_path, capsys):
    (tmp_path / "w.json").write_text("{not json")
    assert main(["check", "--workflow", str(tmp_path / "w.json")]) == 2
    assert str(tmp_path / "w.json") in capsys.readouterr().err


# ---------------------------------------------------------------------- ComfyUI's CPU attention (--comfyui-attention)

def comfy_modules():
    """ComfyUI's attention modules, from the checkout as imported in either mode (the functions are the same)."""
    import sys

    from parity.sides.comfyui import load

    load(Path(COMFYUI), attention=None)
    return (sys.modules["comfy.ldm.modules.attention"], sys.modules["comfy.ldm.modules.diffusionmodules.model"],
            sys.modules["comfy.model_management"])


def free_memory(monkeypatch, mm, free: int) -> None:
    """ComfyUI's free-memory reading replaced by ``free`` bytes: its chunking rules take the low-memory paths."""
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False:
                        (free, free) if torch_free_too else free)


@needs_comfyui
@pytest.mark.parametrize("free, chunks", [(2 ** 40, (4096, 610)), (8 << 20, (256, 610)), (1 << 20, (512, None))],
                         ids=["whole", "query-chunks", "key-chunks"])
def test_sub_quadratic_kernel_is_comfyuis(free, chunks, monkeypatch):
    """impl's sub-quadratic attention against ComfyUI's attention_sub_quad, at every chunking its memory rule picks
    (610 keys: 26 key chunks of 24, the last one of 10)."""
    from impl.math import sub_quadratic_attention, sub_quadratic_chunks

    attention, _, mm = comfy_modules()
    free_memory(monkeypatch, mm, free)
    h, n = 2, 610
    for b in (1, 2):  # one batch row: ComfyUI's per-head operands are views of the input, else copies
        q, k, v = torch.randn(3, b, n, h * 8, generator=torch.Generator().manual_seed(b)).unbind(0)
        if b == 1:  # two rows need twice the memory: 8 MiB takes them to key chunks
            assert sub_quadratic_chunks(free, h, 4, n) == chunks
        assert torch.equal(sub_quadratic_attention(q, k, v, h, free), attention.attention_sub_quad(q, k, v, h))


@needs_comfyui
@pytest.mark.parametrize("free", [2 ** 40, 200_000], ids=["whole", "slices"])
def test_sliced_vae_attention_is_comfyuis(free, monkeypatch):
    """impl's sliced attention against ComfyUI's VAE normal_attention (slice_attention), in one piece and in four
    query slices (256 positions whose scores need 655 kB of 200 kB)."""
    from impl.math import sliced_attention

    _, model, mm = comfy_modules()
    free_memory(monkeypatch, mm, free)
    q, k, v = torch.randn(3, 1, 8, 16, 16, generator=torch.Generator().manual_seed(1)).unbind(0)
    assert torch.equal(sliced_attention(q, k, v, free), model.normal_attention(q, k, v))


@needs_comfyui
def test_matmul_attention_is_comfyuis_basic_kernel():
    """impl's matmul attention against ComfyUI's attention_basic with CLIP's causal mask and a T5 position bias."""
    from impl.math import matmul_attention

    attention, _, _ = comfy_modules()
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 2, 7, 12, generator=g).unbind(0)
    causal = torch.full((7, 7), -torch.finfo(torch.float32).max).triu_(1)
    bias = torch.randn(1, 3, 7, 7, generator=g)
    for mask in (causal, bias):
        assert torch.equal(matmul_attention(q, k, v, 3, mask), attention.attention_basic(q, k, v, 3, mask))


def test_chunked_kernels_compute_attention():
    """Every chunking of impl's ComfyUI kernels is attention: equal to SDPA up to rounding (runs without ComfyUI)."""
    from impl.math import from_heads, matmul_attention, sliced_attention, sub_quadratic_attention

    q, k, v = torch.randn(3, 1, 2, 610, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    flat = [from_heads(t.reshape(2, 610, 8), 2) for t in (q, k, v)]  # (1, 610, 16)
    for free in (2 ** 40, 8 << 20, 1 << 20):
        assert torch.allclose(sub_quadratic_attention(*flat, 2, free), from_heads(expected[0], 2), atol=1e-12)
    assert torch.allclose(matmul_attention(*flat, 2), from_heads(expected[0], 2), atol=1e-12)
    maps = [t[:, :1].reshape(1, 8, 610, 1) for t in (q, k, v)]  # one head as a (B, C, H, W) map
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(m.flatten(2).transpose(1, 2) for m in maps))
    for free in (2 ** 40, 1000):
        assert torch.allclose(sliced_attention(*maps, free=free), sdpa.transpose(1, 2).reshape(1, 8, 610, 1),
                              atol=1e-12)


def test_comfyui_attention_needs_the_comfyui_profile(capsys):
    assert main(["check", "--text-only", "--comfyui-attention", "sub_quad"]) == 2
    assert "ComfyUI's import mode" in capsys.readouterr().err


CPU_ATTENTION = {"families": ("sd3.5-large",), "comfyui_attention": "sub_quad"}


@needs_comfyui
@pytest.mark.parametrize("options", [
    {**CPU_ATTENTION, "prompts": (WEIGHTED, LONG)},
    {**CPU_ATTENTION, "families": ("sd3.5-medium",), "dtype": "bfloat16", "image": True, "steps": 4},  # MMDiT-X
    {**CPU_ATTENTION, "families": ("sd3-medium",), "flags": {"sampler": "sai_dpmpp_2m"}, "steps": 3},
], ids=["large", "medium-bfloat16-img2img", "sd3-medium-dpmpp_2m"])
def test_comfyuis_cpu_attention_is_bitwise_equal(options, ref_cache, image):
    """ComfyUI imported without --use-pytorch-cross-attention: sub-quadratic MMDiT attention, matmul CLIP / T5
    attention and sliced VAE attention, every record bitwise (impl's attention_kernel follows the option)."""
    report = comfy(ref_cache, **with_image(options, image))
    assert report.first_divergence is None and not report.failures
    assert report.flags["attention_kernel"] == "sub_quad"
    assert any("without --use-pytorch-cross-attention" in n for n in report.notes)


@needs_comfyui
def test_attention_kernel_flip_is_local_to_each_attention(ref_cache):
    """impl with SDPA against ComfyUI's CPU kernels, each unit on the reference's inputs (teacher forcing): every
    component's first local error is its attention."""
    report = comfy(ref_cache, **CPU_ATTENTION, prompts=(WEIGHTED, LONG), flags={"attention_kernel": "sdpa"},
                   mode="teacher-forced")
    first = {}
    for r in report.introduced:
        first.setdefault(r["component"], r["layer"])
    assert first == {"clip-l": "layers.0.self_attn.out_proj", "clip-g": "layers.0.self_attn.out_proj",
                     "t5": "block.0.layer.0.SelfAttention.o", "mmdit": "block.0.context.attn.proj",
                     "vae": "decoder.mid.attn_1"}
