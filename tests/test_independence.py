"""Each reference side builds its models from the files with its own loader: a model built with diffusers' and
transformers' own classes at sizes the project never made checks bitwise as a directory; as a single file it is
bitwise when its configs are given, and otherwise refused with every value impl would have had to infer."""
import json
import shutil

import pytest
from conftest import SAI_CODE, needs_sai

from parity.cli import main

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    from odd_model import build

    from parity.embedded import model_dir

    root = tmp_path_factory.mktemp("odd")
    d = build(root / "model", model_dir("sd3-medium"))
    assert main(["convert", str(d), str(root / "odd.safetensors")]) == 0
    tokenizers = root / "tokenizers"
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(d / sub, tokenizers / sub)
    return d, root / "odd.safetensors", tokenizers


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_directory_of_an_unseen_configuration_is_bitwise(odd, capsys):
    d, _, _ = odd
    assert main(["check", "--json", "--model", str(d), "--prompt", "a cat"]) == 0
    out = _json(capsys)
    assert out["first_divergence"] is None and {"t5", "mmdit", "vae"} <= {r["component"] for r in out["records"]}


def test_single_file_with_its_configs_is_bitwise(odd, capsys):
    d, f, _ = odd
    assert main(["check", "--json", "--checkpoint", str(f), "--config", str(d), "--prompt", "a cat"]) == 0
    assert _json(capsys)["first_divergence"] is None


def test_single_file_without_configs_is_refused_with_the_inferred_values(odd, capsys):
    """impl would infer CLIP-L 4 heads (2), CLIP-G 3 (4), T5 max distance 128 (64), VAE 32 groups (16): the
    diffusers side cannot load the file offline without configs, and the message lists what was inferred."""
    _, f, tokenizers = odd
    assert main(["check", "--checkpoint", str(f), "--model", str(tokenizers), "--prompt", "a cat"]) == 3
    err = capsys.readouterr().err
    for inferred in ("clip_l heads = 4 inferred", "clip_g heads = 3 inferred", "t5 max_distance = 128 inferred",
                     "vae groups = 32 inferred"):
        assert inferred in err
    assert "--config DIR" in err and "Traceback" not in err


def test_convert_names_what_it_infers_and_takes_configs(odd, tmp_path, capsys):
    d, f, _ = odd
    assert main(["convert", str(f), str(tmp_path / "a")]) == 0
    assert "note: t5 max_distance = 128 inferred" in capsys.readouterr().out
    assert main(["convert", str(f), str(tmp_path / "b"), "--config", str(d)]) == 0
    assert "inferred" not in capsys.readouterr().out
    for sub, key in (("text_encoder", "num_attention_heads"), ("text_encoder_2", "num_attention_heads"),
                     ("text_encoder_3", "relative_attention_max_distance"), ("transformer", "num_attention_heads"),
                     ("vae", "norm_num_groups")):
        want = json.loads((d / sub / "config.json").read_text())[key]
        assert json.loads((tmp_path / "b" / sub / "config.json").read_text())[key] == want, (sub, key)


def test_single_file_clip_l_projection_flag(capsys, tmp_path):
    """diffusers' from_single_file gives CLIP-L the identity projection whatever the file holds; the embedded
    CLIP-L projection is not the identity, so the flag's other value diverges right there."""
    from parity.convert import diffusers_to_sai_file
    from parity.embedded import model_dir

    d = model_dir("sd3-medium")
    diffusers_to_sai_file(d, tmp_path / "m.safetensors")
    run = ["check", "--json", "--checkpoint", str(tmp_path / "m.safetensors"), "--config", str(d), "--prompt", "a cat",
           "--text-only"]
    assert main(run) == 0
    capsys.readouterr()
    assert main([*run, "--flag", "single_file_clip_l_projection=file"]) == 1
    fd = _json(capsys)["first_divergence"]
    assert (fd["component"], fd["layer"]) == ("clip-l", "weight:text_projection.weight")  # found as a parameter


@needs_sai
def test_the_sd3_5_code_refuses_what_it_cannot_build(odd, capsys):
    """Its CLIP wrapper asserts a depth its layer index fits; it runs depth heads of 64 and a T5 with fixed buckets:
    each is refused by name (exit 3), never a silent pass or a divergence blamed on impl."""
    d, f, _ = odd
    assert main(["check", "--profile", "sai", "--sai-code", SAI_CODE, "--checkpoint", str(f), "--config", str(d),
                 "--prompt", "a cat"]) == 3
    err = capsys.readouterr().err
    assert "the SD3.5 code refused the clip-l encoder (ClipL) at other_impls.py:" in err and "Traceback" not in err


@needs_sai
def test_a_converted_single_file_checks_against_the_sd3_5_code_without_further_options(tmp_path, capsys):
    """Its text encoders have the embedded vocabularies, so the embedded tokenizers are used (and said so)."""
    from parity.convert import diffusers_to_sai_file
    from parity.embedded import model_dir

    diffusers_to_sai_file(model_dir("sd3.5-large"), tmp_path / "m.safetensors")
    assert main(["check", "--json", "--profile", "sai", "--sai-code", SAI_CODE, "--checkpoint",
                 str(tmp_path / "m.safetensors"), "--prompt", "a cat"]) == 0
    out = _json(capsys)
    assert out["first_divergence"] is None and any("embedded default's vocabularies" in n for n in out["notes"])
