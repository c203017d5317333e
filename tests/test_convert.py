"""SAI single file <-> diffusers layout: exact round trips, config inference against the real dimensions,
strict errors, and nothing half-written."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from impl import embedded
from impl.checkpoint import PRESETS, infer_mmdit_config, infer_vae_config, match_presets, read_sai_checkpoint
from impl.mmdit import MMDiT
from impl.weights import WeightError
from parity import convert
from parity.cli import main


@pytest.fixture(scope="module")
def pipeline_dir():
    from parity.embedded import model_dir

    return model_dir("sd3.5-medium")


def test_round_trip_is_byte_identical(pipeline_dir, tmp_path, capsys):
    assert main(["convert", str(pipeline_dir), str(tmp_path / "m.safetensors")]) == 0
    parts = read_sai_checkpoint(tmp_path / "m.safetensors")
    want = embedded.mmdit_weights("sd3.5-medium")
    assert parts["mmdit"].keys() == want.keys() and all(torch.equal(parts["mmdit"][k], want[k]) for k in want)
    assert all(torch.equal(parts["vae"][k], v) for k, v in embedded.vae_weights().items())
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back")]) == 0
    for name in ("transformer/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model",
                 "text_encoder_2/model", "text_encoder_3/model"):
        assert (tmp_path / "back" / f"{name}.safetensors").read_bytes() == (pipeline_dir / f"{name}.safetensors").read_bytes()
    out = capsys.readouterr().out
    assert "dual layers [0, 1]" in out and "text_encoder_2: clip_g, 4 layers, width 48, 3 heads" in out


@pytest.mark.parametrize("family", list(embedded.MMDIT))
def test_infer_embedded_configs(family):
    assert infer_mmdit_config(embedded.mmdit_weights(family)) == embedded.MMDIT[family]
    assert match_presets(embedded.MMDIT[family]) == []


@pytest.mark.parametrize("name", list(PRESETS))
def test_infer_real_dimensions_from_shapes(name):
    """Shapes only (meta tensors): the inferred config is the preset; Large and Large-Turbo are indistinguishable."""
    with torch.device("meta"):
        state = MMDiT(PRESETS[name]).state_dict()
    config = infer_mmdit_config(state)
    assert config == PRESETS[name]
    assert match_presets(config) == (["sd3.5-large", "sd3.5-large-turbo"] if "large" in name else [name])


def test_infer_vae_config():
    assert infer_vae_config(embedded.vae_weights()) == embedded.VAE


def _sai_file(tmp_path, edit):
    state = {"model.diffusion_model." + k: v for k, v in embedded.mmdit_weights("sd3-medium").items()}
    edit(state)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"lora_unet.x": torch.zeros(1)}), r"1 keys outside the SAI layout .*: lora_unet.x"),
    (lambda s: s.pop("model.diffusion_model.x_embedder.proj.weight"), r"missing x_embedder.proj.weight"),
    (lambda s: s.update({"model.diffusion_model.pos_embed": torch.zeros(1, 255, 128)}), r"255 rows, not a square"),
    (lambda s: s.pop("model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.bias"),
     r"missing \(1\): joint_blocks.1.x_block.mlp.fc2.bias"),
    (lambda s: s.update({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(383, 128)}),
     r"mis-shaped \(1\): joint_blocks.0.x_block.attn.qkv.weight: \(383, 128\) vs model \(384, 128\)"),
])
def test_bad_checkpoints_fail_by_name_and_leave_nothing(tmp_path, edit, message):
    src = _sai_file(tmp_path, edit)
    with pytest.raises(WeightError, match=message):
        convert.sai_file_to_diffusers(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_pickle_and_truncated_files_are_refused(tmp_path, capsys):
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x02}q\x00.")
    assert main(["convert", str(tmp_path / "p.safetensors"), str(tmp_path / "o")]) == 2
    assert "pickle" in capsys.readouterr().err
    good = _sai_file(tmp_path, lambda s: None)
    (tmp_path / "t.safetensors").write_bytes(good.read_bytes()[:-100])
    assert main(["convert", str(tmp_path / "t.safetensors"), str(tmp_path / "o")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_failure_mid_write_leaves_no_partial_output(pipeline_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full (injected)")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="injected"):
        convert.diffusers_to_sai_file(pipeline_dir, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    convert.diffusers_to_sai_file(pipeline_dir, tmp_path / "m.safetensors")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="injected"):
        convert.sai_file_to_diffusers(tmp_path / "m.safetensors", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert load_file(str(tmp_path / "m.safetensors"))  # the earlier output is intact


def test_check_from_an_sai_checkpoint(pipeline_dir, tmp_path, capsys):
    """impl loads the SAI file by identity; the reference runs a converted copy; every record bitwise."""
    import json

    assert main(["convert", str(pipeline_dir), str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    assert main(["check", "--json", "--checkpoint", str(tmp_path / "m.safetensors"), "--config", str(pipeline_dir),
                 "--prompt", "a cat"]) == 0
    out = json.loads(capsys.readouterr().out)
    models = {r["model"] for r in out["records"] if r["component"] == "mmdit"}
    assert models == {"m.safetensors"} and out["first_divergence"] is None
    state = load_file(str(tmp_path / "m.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, str(tmp_path / "n.safetensors"))
    cfg = ["--config", str(pipeline_dir)]
    assert main(["check", "--checkpoint", str(tmp_path / "n.safetensors"), *cfg, "--text-only"]) == 0  # no image side
    assert main(["check", "--checkpoint", str(tmp_path / "n.safetensors"), *cfg, "--prompt", "a cat"]) == 2
    assert "no first_stage_model.* (VAE) keys" in capsys.readouterr().err


def test_single_file_text_encoders():
    from impl.checkpoint import infer_clip_config, infer_t5_config, load_text_encoders

    w = embedded.text_weights()
    assert infer_clip_config(w["clip_l"], "clip_l", "x") == embedded.CLIP_L
    assert infer_clip_config(w["clip_g"], "clip_g", "x") == embedded.CLIP_G
    assert infer_t5_config(w["t5"], "x") == embedded.T5
    state = {f"clip_l.transformer.{k}": v for k, v in w["clip_l"].items() if k != "text_projection.weight"}
    models, _, notes, _ = load_text_encoders(state, "f")
    assert torch.equal(models["clip_l"].text_projection.weight, torch.eye(32)) and "identity" in notes[0]
    wide = {k: torch.zeros(v.shape[0], 40) if k.endswith("token_embedding.weight") else v for k, v in state.items()}
    with pytest.raises(WeightError, match="CLIP width 40 has no known head count"):
        load_text_encoders(wide, "f")
    with pytest.raises(WeightError, match=r"1 keys outside the text encoders \(clip_l.transformer."):
        load_text_encoders({"clip_x.transformer.a": torch.zeros(1)}, "f")


def test_check_checkpoint_uses_the_files_text_encoders(pipeline_dir, tmp_path, capsys):
    """A nudged CLIP-G weight in the file: impl and the reference both use it, so the run stays bitwise equal
    (it would diverge at input.context if impl fell back to the embedded encoders)."""
    import json

    convert.diffusers_to_sai_file(pipeline_dir, tmp_path / "m.safetensors")
    state = load_file(str(tmp_path / "m.safetensors"))
    key = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    state[key] = state[key] * 1.5
    save_file(state, str(tmp_path / "n.safetensors"))
    assert main(["check", "--json", "--checkpoint", str(tmp_path / "n.safetensors"), "--config", str(pipeline_dir),
                 "--prompt", "a cat"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["first_divergence"] is None
    assert f"text encoders from {tmp_path / 'n.safetensors'}; tokenizers from {pipeline_dir}" in out["notes"]


def test_safetensors_whose_header_length_starts_with_0x80_is_not_a_pickle(tmp_path):
    """The low byte of the header length can be 0x80, a pickle's first byte: such files must still load."""
    from impl.weights import read_safetensors

    for pad in range(300):
        path = tmp_path / "w.safetensors"
        save_file({"a": torch.ones(3)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a 0x80 header-length byte")
    assert torch.equal(read_safetensors(path)["a"], torch.ones(3))
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 20)  # a real pickle's start
    with pytest.raises(WeightError, match="pickle"):
        read_safetensors(tmp_path / "p.safetensors")
