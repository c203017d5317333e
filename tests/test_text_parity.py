"""impl text encoders against transformers / diffusers, layer by layer, and the compatibility flags."""
import ast
import json
import re
from pathlib import Path

import pytest
import torch

from parity import flags as F
from parity.cli import main
from parity.run import Spec, check

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a cat", "wow!! amazing! so cool!!!", "(masterpiece:1.2), a (red) cat, ((blue eyes))",
           " ".join(["cat"] * 74) + " photorealistic"]


def text(prompts, profile="diffusers", dtype="float32", cache=None, **flags):
    """The text comparison of the embedded default, impl against the profile's reference."""
    return check(Spec(prompts=tuple(prompts), profile=profile, dtype=dtype, overrides=tuple(sorted(flags.items())),
                      text_only=True), cache)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_layer_bitwise(model_dir, dtype):
    report = text(PROMPTS, "diffusers", dtype)
    comps = {r["component"] for r in report.records}
    assert comps == {"clip-l", "clip-g", "t5", "conditioning"}
    layers = {r["layer"] for r in report.records if r["component"] == "clip-g"}
    assert {"layers.3.self_attn", "layers.3.resid_attn", "layers.3.mlp", "final_layer_norm", "input_ids"} <= layers
    assert report.first_divergence is None, report.first_divergence


def test_injected_change_is_caught_and_located(model_dir, monkeypatch):
    """A one-ulp change in one layer's output must show up as the first divergence at that layer."""
    from parity.sides import impl as side

    load = side.load_stack

    def faulty(*a):
        stack, notes = load(*a)
        fc1 = stack.clip_g.text_model.encoder.layers[2].mlp.fc1
        fc1.register_forward_hook(lambda m, args, out: torch.nextafter(out, torch.full_like(out, 10.0)))
        return stack, notes
    monkeypatch.setattr(side, "load_stack", faulty)
    report = text(["a photo of a cat"])
    fd = report.first_divergence
    assert (fd["component"], fd["layer"]) == ("clip-g", "layers.2.mlp.fc1")
    assert len(report.failures) > 0


# each flag flipped away from the profile value changes what it says it changes
FLIPS = [
    ("clip_g_tokenizer", "hf", "wow!! so cool!", "clip-g", "input_ids"),
    ("clip_l_tokenizer", "openai", "salt &amp; pepper", "clip-l", "input_ids"),
    ("clip_l_pad", 0, "a cat", "clip-l", "input_ids"),
    ("clip_g_pad", 49407, "a cat", "clip-g", "input_ids"),
    ("prompt_split", "words", "(red:1.3) cat", "clip-l", "input_ids"),
    ("t5_length_rule", "sai", "a cat", "t5", "input_ids"),
    ("t5_mask", True, "a cat", "t5", "block.0.layer.0.SelfAttention.o"),  # q/k/v equal; the mask acts inside
    ("t5_attention", "eager", "a cat", "t5", "block.0.layer.0.SelfAttention.o"),  # transformers 4.x's kernel
    ("t5_activation", "gelu_tanh", "a cat", "t5", "block.0.layer.1.DenseReluDense.wo"),  # the SD3.5 code's GELU
    ("clip_l_pooled_projected", False, "a cat", "conditioning", "pooled"),
    ("encoder_dtype", "float32", "a cat", "clip-l", "token_embedding"),  # float32 vs the pipeline's bfloat16
    ("text_encoder_storage", "float16", "a cat", "clip-l", "weight:text_model.embeddings.token_embedding.weight"),
    ("attention_kernel", "sub_quad", "a cat", "clip-l", "layers.0.self_attn.out_proj"),  # ComfyUI's CPU kernels
    ("empty_encoder_text", "empty", ("a cat", "", "a dog"), "clip-g", "input_ids"),  # diffusers: prompt_2 or prompt
]


@pytest.mark.parametrize("name,value,prompt,component,layer", FLIPS)
def test_flag_flip_changes_output(model_dir, ref_cache, name, value, prompt, component, layer):
    """impl with one flag flipped against diffusers (computed once per prompt and dtype: ``ref_cache``)."""
    dtype = "bfloat16" if name == "encoder_dtype" else "float32"
    report = text([prompt], "diffusers", dtype, ref_cache, **{name: value})
    fd = report.first_divergence
    assert fd is not None and (fd["component"], fd["layer"]) == (component, layer)
    assert text([prompt], "diffusers", dtype, ref_cache).first_divergence is None  # the flag, not the prompt


def test_per_encoder_texts_reach_each_encoder(stack, ref_cache, capsys):
    """CLIP-L's, CLIP-G's and T5's own texts: diffusers' prompt, prompt_2 and prompt_3, bitwise; each encoder's ids
    are its own text's; the image run takes them too."""
    from impl.text import clip_ids, encode_prompt, t5_ids

    texts = ("a photo of a cat", "wow!! a red dog", "an oil painting of a bird")
    report = text([texts], "diffusers", cache=ref_cache)
    assert report.first_divergence is None and not report.failures
    s = F.settings(F.profile_values("diffusers"))
    ids = encode_prompt(stack, texts, s).ids
    assert ids["clip-l"] == clip_ids(stack, texts[0], s.clip_l_mode, s.clip_l_pad, s.split)
    assert ids["clip-g"] == clip_ids(stack, texts[1], s.clip_g_mode, s.clip_g_pad, s.split) != \
        clip_ids(stack, texts[0], s.clip_g_mode, s.clip_g_pad, s.split)
    assert ids["t5"] == t5_ids(stack, texts[2], s) != t5_ids(stack, texts[0], s)
    assert main(["check", "--family", "sd3.5-medium", "--prompt", texts[0], "--prompt-clip-g", texts[1],
                 "--prompt-t5", texts[2]]) == 0
    out = capsys.readouterr().out
    assert "prompt 0: clip-l 'a photo of a cat', clip-g 'wow!! a red dog', t5 'an oil painting of a bird'" in out
    assert "first divergence: none" in out


def test_every_flag_is_flipped_or_has_a_reason():
    untested = {f.name for f in F.FLAGS if f.side == "text"} - {row[0] for row in FLIPS}
    # clip_pool: argmax == first EOS for every CLIP vocabulary id (EOS 49407 is the largest), tested on raw ids below
    # t5_absent: changes the context length, tested below
    # t5_max_length: a diffusers argument both sides receive, tested on impl below
    # single_file_clip_l_projection: acts only on single files (test_independence)
    # prompt_weights, clip_chunks: act only with a split that parses weights and chunks (prompt_split words or
    # segments), flipped from the comfyui profile against ComfyUI itself (test_comfyui)
    assert untested == {"clip_pool", "t5_absent", "t5_max_length", "single_file_clip_l_projection", "prompt_weights",
                        "clip_chunks"}


def test_t5_padding_length_changes_real_token_states_without_mask(stack):
    """QUIRKS T9: without a mask the T5 states of the real tokens depend on the padding length."""
    from impl.text import encode_prompt

    base = F.profile_values("diffusers")
    out = {}
    for mask in (False, True):
        for n in (77, 256):
            out[mask, n] = encode_prompt(stack, "a photo of a cat", F.settings({**base, "t5_max_length": n,
                                                                                 "t5_mask": mask})).t5[0, :6]
    unmasked = (out[False, 77] - out[False, 256]).norm() / out[False, 256].norm()
    assert out[False, 77].shape == (6, 96) and unmasked > 1e-2
    assert torch.allclose(out[True, 77], out[True, 256], rtol=0, atol=1e-6)


def test_clip_pool_rule(stack):
    ids = torch.tensor([[49406, 320, 49407, 49408 - 1, 5] + [49407] * 72])
    ids[0, 3] = 49407
    ids[0, 1] = 49407  # a literal EOS early: both rules pick position 1
    a, b = stack.clip_l(ids, pool="argmax"), stack.clip_l(ids, pool="first_eos")
    assert torch.equal(a.pooled, b.pooled)
    fake = stack.clip_l.config.eos_id
    from impl.clip import pooled_index

    assert pooled_index(torch.tensor([[5, fake, fake + 1]]), "argmax", fake).item() == 2
    assert pooled_index(torch.tensor([[5, fake, fake + 1]]), "first_eos", fake).item() == 1


def test_t5_absent(stack):
    from impl.text import encode_prompt

    base = F.profile_values("diffusers")
    zeros = encode_prompt(stack, "a cat", F.settings({**base, "t5_absent": "zeros"}))
    none = encode_prompt(stack, "a cat", F.settings({**base, "t5_absent": "none"}))
    assert zeros.context.shape == (1, 77 + 256, 96) and none.context.shape == (1, 77, 96)
    assert torch.count_nonzero(zeros.context[:, 77:]) == 0


def test_sai_tokenization_examples_from_quirks(stack):
    from impl.text import clip_ids, t5_ids

    s = F.settings(F.profile_values("sai"))
    ids = clip_ids(stack, "(masterpiece:1.2), a (red) cat, ((blue eyes))", "hf", 49407, "words")
    # words masterpiece , a red cat, blue eyes -> 8 content ids (10 with BOS/EOS; QUIRKS T2 says "10"), HF 17
    assert ids.index(49407) - 1 == 8
    assert clip_ids(stack, "(masterpiece:1.2), a (red) cat, ((blue eyes))", "hf", 49407, "whole").index(49407) - 1 == 17
    long = " ".join(["cat"] * 74) + " photorealistic"
    assert clip_ids(stack, long, "hf", 49407, "words").index(49407) - 1 == 74  # T3: the word moves to chunk 1
    assert clip_ids(stack, long, "hf", 49407, "whole").index(49407) - 1 == 75
    assert len(t5_ids(stack, "a cat", s)) == 77 and len(t5_ids(stack, "a " * 200, s)) > 77


def test_cli_json_and_exit_codes(model_dir, capsys):
    assert main(["check", "--json", "--prompt", "a cat", "--text-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    rec = out["records"][0]
    assert {"component", "layer", "shape", "dtype", "max_abs_err", "max_ulp", "bitwise_equal"} <= set(rec)
    assert main(["check", "--prompt", "a cat", "--flag", "clip_l_pad=0", "--text-only"]) == 1
    assert re.search(r"first divergence: #\d+ p0 clip-l input_ids", capsys.readouterr().out)
    assert main(["check", "--flag", "nope=1"]) == 2


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 10000, "\x00\x01\x1b[31m", "<|endoftext|></s><pad>!",
                                    "<extra_id_0>(((("])
def test_tokens_never_crashes(prompt, capsys):
    assert main(["tokens", prompt, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for enc in ("clip-l", "clip-g", "t5"):
        for mode, e in out["encoders"][enc].items():
            assert "error" in e or (e["ids"] and (enc == "t5" or len(e["ids"]) == 77)), (enc, mode)


def test_tokens_reports_bang_difference(capsys):
    main(["tokens", "wow!! amazing!", "--json"])
    g = json.loads(capsys.readouterr().out)["encoders"]["clip-g"]
    assert g["diffusers"]["ids"][1:6] == [2781, 0, 0, 1370, 0] and g["sai"]["ids"][1:4] == [2781, 748, 1370]


def test_impl_never_imports_a_reference_library():
    banned = {"diffusers", "transformers", "tokenizers", "sentencepiece", "huggingface_hub", "google", "accelerate",
              "open_clip", "clip"}
    for path in (ROOT / "impl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for n in names:
                assert n.split(".")[0] not in banned, f"{path.name} imports {n}"


def test_wrong_weights_never_load_silently(stack, tmp_path):
    from impl.clip import ClipTextEncoder
    from impl.embedded import CLIP_G
    from impl.weights import WeightError, load_strict, read_safetensors

    sd = dict(stack.clip_l.state_dict())
    with pytest.raises(WeightError, match=r"mis-shaped .*text_model.embeddings.token_embedding.weight"):
        load_strict(ClipTextEncoder(CLIP_G), sd, "clip_l file into CLIP-G")
    sd.pop("text_projection.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightError, match=r"missing \(1\): text_projection.weight"):
        load_strict(stack.clip_l.__class__(stack.clip_l.config), sd, "x")
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(WeightError, match="header"):
        read_safetensors(bad)
    pk = tmp_path / "model.ckpt"
    pk.write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    with pytest.raises(WeightError, match="pickle"):
        read_safetensors(pk)


# ---------------------------------------------------------------------------------------------- tokens diagnosis

def test_tokens_shows_the_real_tokenizers_and_marks_agreement(capsys):
    assert main(["tokens", "wow!! a (red:1.2) cat", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "embedded default" in out["vocabulary"] and "tiny T5" in out["vocabulary"]
    refs = out["references"]
    assert {"transformers tokenizer/", "diffusers pipeline", "openai SimpleTokenizer"} <= set(refs["clip-l"])
    assert {"transformers tokenizer_3/", "sentencepiece library"} <= set(refs["t5"])
    rows = out["encoders"]["clip-g"]
    assert rows["hf-bang-pad"]["same_as_reference"] and rows["hf-bang-pad"]["reference"] == "transformers tokenizer_2/"
    assert rows["hf-bang-pad"]["content"] == refs["clip-g"]["transformers tokenizer_2/"]["ids"]
    assert "same_as_reference" not in rows["hf-slow-noftfy"]  # transformers 5 has no slow tokenizer to check it by
    assert main(["tokens", "wow!! a cat"]) == 0
    text = capsys.readouterr().out
    assert "= transformers tokenizer/" in text and "ids [49406, 2781, 748, 320, 2368, 49407 x 72]" in text


def test_tokens_marks_a_broken_bpe_in_every_mode(monkeypatch, capsys):
    """A fault shared by every impl mode (here: BPE merges nothing) is caught against the real tokenizers."""
    from impl import clip_tokenizer

    monkeypatch.setattr(clip_tokenizer, "merge_lowest_first", lambda parts, ranks: parts)
    assert main(["tokens", "a photo of a cat"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS from transformers tokenizer/" in out and "DIFFERS from openai SimpleTokenizer" in out
    assert "impl differs from the tokenizer it reproduces: clip-l openai vs openai SimpleTokenizer" in out


def test_tokens_over_a_held_out_corpus(capsys):
    """Every impl row against the tokenizer it reproduces, prompt by prompt (the SD3.5 code's and ComfyUI's too when
    present)."""
    from conftest import SAI_CODE, ROOT
    from test_comfyui import COMFYUI

    sai = ["--sai-code", SAI_CODE] if (Path(SAI_CODE) / "sd3_infer.py").is_file() else []
    comfy = ["--comfyui", COMFYUI] if (Path(COMFYUI) / "comfy" / "sd.py").is_file() else []
    assert main(["tokens", "--prompt-file", str(ROOT / "tests" / "data" / "prompts.jsonl"), "--json", *sai,
                 *comfy]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 25 and all(s["differ"] == 0 and s["compared"] == 25 for s in out["rows"].values())
    assert len(out["rows"]) == 9 + (3 if sai else 0) + (3 if comfy else 0)
    assert not comfy or {"clip-l comfyui vs comfyui", "clip-g comfyui vs comfyui", "t5 comfyui vs comfyui"} <= \
        set(out["rows"])
    ftfy = out["reference_pairs"]["clip-l openai SimpleTokenizer vs transformers tokenizer/"]
    assert ftfy["differ"] > 0 and ftfy["classes"]["ftfy repairs"] > 0


@pytest.mark.parametrize("content,says", [('{"prompt": "a"}\n{"text": "b"}\n', ":2: expected an object with a string"),
                                          ('{"prompt": "a"}\n{oops\n', ":2: not JSON"),
                                          (b"\xff\xfe", "not a readable UTF-8 text file")])
def test_tokens_prompt_file_errors(tmp_path, capsys, content, says):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["tokens", "--prompt-file", str(path)]) == 2
    assert says in capsys.readouterr().err


def test_tokens_plain_text_prompt_file(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("a photo of a cat\n\nwow!!\n")
    assert main(["tokens", "--prompt-file", str(path)]) == 0
    assert capsys.readouterr().out.startswith("2 prompts; vocabulary: the embedded default")
