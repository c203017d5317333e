"""``sd3parity explain``: the flag values that remove a divergence, found as combinations, with what each moves."""
import json

from conftest import SAI_CODE, needs_sai

from parity.cli import main


def _explain(capsys, *argv):
    code = main(["explain", "--json", *map(str, argv)])
    return code, json.loads(capsys.readouterr().out)


def test_nothing_to_explain(capsys):
    code, out = _explain(capsys, "--text-only", "--prompt", "a cat")
    assert code == 0 and out["found"] == [] and out["runs"] == 1 and out["verdict"].startswith("nothing to explain")


def test_progress_is_drawn_on_a_terminal_only(capsys):
    """The progress line is redrawn in place with carriage returns: to a file or a pipe it would be noise."""
    assert main(["explain", "--text-only", "--prompt", "a cat"]) == 0
    out = capsys.readouterr()
    assert "run 1" not in out.err and "nothing to explain" in out.out


def test_three_text_quirks_at_once(capsys):
    """impl run with three quirks of the SD3.5 code against diffusers: the search names exactly the three values
    that undo them, and each one, left out, leaves its own records failing."""
    code, out = _explain(capsys, "--text-only", "--prompt", "wow!! a cat", "--flag", "t5_length_rule=sai",
                         "--flag", "clip_g_tokenizer=hf", "--flag", "t5_activation=gelu_tanh")
    assert code == 0
    assert sorted(map(tuple, out["found"])) == [("clip_g_tokenizer", "hf-bang-pad"), ("t5_activation", "gelu_new"),
                                                ("t5_length_rule", "max_length")]
    firsts = {e["flag"]: e["without_it"]["first_divergence"] for e in out["effects"]}
    assert firsts == {"clip_g_tokenizer": "embedded-default 0 clip-g input_ids",
                      "t5_length_rule": "embedded-default 0 t5 input_ids",
                      "t5_activation": "embedded-default 0 t5 block.0.layer.1.DenseReluDense.wo"}


def test_two_image_quirks_at_once(capsys):
    """fp16 timestep rounding (from step 1: sigma 1 gives exactly 1000 at step 0) and guidance in x0 space
    together, on one tiny family; each, left out, moves the final latent."""
    code, out = _explain(capsys, "--family", "sd3-medium", "--steps", 2, "--prompt", "a cat",
                         "--flag", "timestep_dtype=float16", "--flag", "cfg_space=x0")
    assert code == 0
    assert sorted(map(tuple, out["found"])) == [("cfg_space", "velocity"), ("timestep_dtype", "float32")]
    moved = {e["flag"]: e["without_it"] for e in out["effects"]}
    assert moved["timestep_dtype"]["first_divergence"] == "embedded-sd3-medium sampler input.timestep 1 uncond"
    assert moved["cfg_space"]["first_divergence"] == "embedded-sd3-medium sampler x0 0"
    # the final latent moves; the uint8 image too on some CPUs: cfg_space's 5e-6 latent change leaves every pixel
    # of this tiny run as it was on an AMD EPYC (Zen 4), and moves one on an Intel Xeon
    assert all(m["latent_max_abs"] > 0 and m["image_max_abs"] is not None for m in moved.values())


@needs_sai
def test_between_diffusers_and_the_sd3_5_code(capsys):
    """Which quirks separate impl's diffusers profile from the SD3.5 code's text stack: the five text flags on which
    the profiles differ and that matter for this prompt, found against the code itself."""
    code, out = _explain(capsys, "--text-only", "--prompt", "wow!! a (red:1.2) cat", "--between", "diffusers", "sai",
                         "--sai-code", SAI_CODE)
    assert code == 0
    assert sorted(n for n, _ in out["found"]) == ["clip_g_tokenizer", "clip_l_pooled_projected", "prompt_split",
                                                  "t5_activation", "t5_length_rule"]
