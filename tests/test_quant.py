"""Scaled-fp8 single files (ComfyUI's layout): the converter, impl's dequantization, and the references that do not
read them refusing them by name. Against ComfyUI itself: tests/test_comfyui.py."""
import json

import pytest
import torch

from impl import quant
from impl.weights import WeightError, read_safetensors
from parity.cli import main


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory):
    from parity.embedded import single_file

    dst = tmp_path_factory.mktemp("fp8") / "sd3.5-medium-fp8.safetensors"
    assert main(["convert", "--fp8-scaled", str(single_file("sd3.5-medium")), str(dst)]) == 0
    return dst


def test_the_converter_writes_comfyuis_scaled_layout(fp8_file):
    from parity.embedded import single_file

    src, out = read_safetensors(single_file("sd3.5-medium")), read_safetensors(fp8_file)
    p = "model.diffusion_model."
    linear = [k for k, v in src.items() if k.startswith(p) and k.endswith(".weight") and v.ndim == 2]
    assert linear and out[p + "scaled_fp8"].dtype == torch.float8_e4m3fn
    for k in linear:
        w8, scale = out[k], out[k[:-len("weight")] + "scale_weight"]
        assert w8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.numel() == 1
        assert w8.float().abs().max() == 448  # the largest magnitude maps to float8's largest value
        back = w8.float() * scale
        assert torch.allclose(back, src[k], rtol=2 ** -3, atol=float(scale) * 2 ** -9)  # 3 mantissa bits
    assert all(torch.equal(out[k], v) for k, v in src.items() if k not in linear)


def test_impl_dequantizes_in_the_compute_dtype_and_consumes_the_scales(fp8_file):
    from impl.checkpoint import read_sai_checkpoint

    mmdit = read_sai_checkpoint(fp8_file)["mmdit"]
    assert quant.is_quantized(mmdit)
    for dtype in (torch.float32, torch.bfloat16):
        state, layers = quant.dequantize(mmdit, dtype, "f")
        assert layers and not any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in state)
        layer = layers[0]
        w8, scale = mmdit[f"{layer}.weight"], mmdit[f"{layer}.scale_weight"]
        assert torch.equal(state[f"{layer}.weight"], w8.to(dtype) * scale.to(dtype))  # two roundings in bfloat16
        assert state[f"{layer}.bias"] is mmdit[f"{layer}.bias"]


def test_comfy_quant_layout_reads_like_the_scaled_fp8_one():
    """The layout ComfyUI's own save nodes write: ``L.comfy_quant`` JSON with ``L.weight_scale``."""
    w8 = (torch.arange(12.0).reshape(3, 4) - 6).to(torch.float8_e4m3fn)
    scale, bias = torch.tensor(0.25), torch.ones(3)
    old = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "l.weight": w8, "l.scale_weight": scale,
           "l.scale_input": torch.tensor(1.0), "l.bias": bias}
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    new = {"l.comfy_quant": conf, "l.weight": w8, "l.weight_scale": scale, "l.input_scale": torch.tensor(1.0),
           "l.bias": bias}
    (a, la), (b, lb) = quant.dequantize(old, torch.float32, "old"), quant.dequantize(new, torch.float32, "new")
    assert la == lb == ["l"] and a.keys() == b.keys() == {"l.weight", "l.bias"}
    assert torch.equal(a["l.weight"], b["l.weight"]) and torch.equal(a["l.weight"], w8.float() * 0.25)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"l.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}),
     "l.comfy_quant: format 'nvfp4' is not read"),
    (lambda s: s.update({"l.comfy_quant": torch.tensor(list(b"{nope"), dtype=torch.uint8)}),
     "l.comfy_quant is not the JSON"),
    (lambda s: s.update({"l.weight": s["l.weight"].float()}), "l.weight is torch.float32, but its layer's format"),
    (lambda s: s.update({"l.scale_weight": torch.ones(2)}), "l.scale_weight has shape (2,)"),
    (lambda s: s.pop("l.weight"), "layer l is scaled but l.weight is missing"),
])
def test_bad_scaled_layers_are_named(edit, message):
    state = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "l.weight": torch.zeros(2, 2).to(
        torch.float8_e4m3fn), "l.scale_weight": torch.tensor(1.0)}
    edit(state)
    with pytest.raises(WeightError, match="^f: " + message.replace("(", r"\(").replace(")", r"\)")):
        quant.dequantize(state, torch.float32, "f")


def test_column_major_keeps_the_values():
    lin = torch.nn.Linear(4, 3)
    before = lin.weight.detach().clone()
    quant.column_major(torch.nn.Sequential(lin), ["0"])
    assert torch.equal(lin.weight, before) and lin.weight.stride() == (1, 3) and lin.weight.t().is_contiguous()


@pytest.mark.parametrize("profile", ["diffusers", "sai"])
def test_references_that_do_not_read_scaled_fp8_refuse_it(profile, fp8_file, capsys):
    from conftest import ROOT

    from parity.embedded import model_dir

    args = ["check", "--profile", profile, "--checkpoint", str(fp8_file), "--model", str(model_dir("sd3.5-medium"))]
    if profile == "sai":
        code = ROOT.parent / "shared" / "references" / "sd3.5"
        if not (code / "sd3_impls.py").is_file():
            pytest.skip(f"no SD3.5 code at {code}")
        args += ["--sai-code", str(code)]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert f"scaled-fp8 layout, which the {profile} reference does not read" in err and "Traceback" not in err


def test_the_converter_scales_a_single_files_t5_too(tmp_path):
    from parity.convert import diffusers_to_sai_file
    from parity.embedded import model_dir

    full, scaled = tmp_path / "m.safetensors", tmp_path / "m-fp8.safetensors"
    diffusers_to_sai_file(model_dir("sd3.5-medium"), full)
    assert main(["convert", "--fp8-scaled", str(full), str(scaled)]) == 0
    out, p = read_safetensors(scaled), "text_encoders.t5xxl.transformer."
    assert out[p + "scaled_fp8"].numel() == 0
    fp8 = {k for k, v in out.items() if v.dtype == torch.float8_e4m3fn and k.startswith(p) and v.numel()}
    assert fp8 and all(k[:-len("weight")] + "scale_weight" in out for k in fp8)
    assert not any(".relative_attention_bias." in k or "embed" in k or "shared" in k for k in fp8)
    assert not any(k.startswith("text_encoders.clip") and v.dtype == torch.float8_e4m3fn for k, v in out.items())
    from impl.checkpoint import load_text_encoders, read_sai_checkpoint

    models, _, _, quantized = load_text_encoders(read_sai_checkpoint(scaled)["text_encoders"], str(scaled))
    assert sorted(quantized) == ["t5"] and len(quantized["t5"]) == len(fp8)


def test_converting_twice_or_a_directory_is_refused(fp8_file, tmp_path, capsys):
    assert main(["convert", "--fp8-scaled", str(fp8_file), str(tmp_path / "x.safetensors")]) == 2
    assert "already quantized" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert main(["convert", "--fp8-scaled", str(tmp_path), str(tmp_path / "y.safetensors")]) == 2
    assert "converts an SAI single file" in capsys.readouterr().err and not list(tmp_path.iterdir())
