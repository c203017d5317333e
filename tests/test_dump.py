"""Activation dumps: ``sd3parity dump`` in both naming schemes, ``compare-dumps``, malformed dumps, and an
implementation outside PyTorch (impl's MMDiT in ONNX Runtime) compared layer by layer."""
import json

import pytest

from parity.cli import main

RUN = ["--family", "sd3.5-medium", "--prompt", "a cat", "--steps", "1"]


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dumps")
    assert main(["dump", *RUN, "--out", str(root / "impl")]) == 0
    assert main(["dump", *RUN, "--side", "diffusers", "--scheme", "diffusers", "--out", str(root / "diffusers")]) == 0
    return root


def _compare(capsys, *argv):
    code = main(["compare-dumps", "--json", *map(str, argv)])
    return code, json.loads(capsys.readouterr().out)


def test_impl_against_diffusers_named_by_diffusers(dumps, capsys):
    """diffusers' records written under its own module names (``transformer_blocks.1:output.1``, the
    (scale, shift) ``norm_out.linear``) read back into impl's names: every record of both dumps pairs and is
    bitwise equal, as in ``check``."""
    m = json.loads((dumps / "diffusers" / "manifest.json").read_text())
    layers = {r["layer"] for r in m["records"]}
    assert {"transformer_blocks.1:output.1", "norm_out.linear", "decoder.up_blocks.0.resnets.0",
            "text_model.encoder.layers.0.layer_norm2:input", "encoder.block.0.layer.0.SelfAttention"} <= layers
    assert m["producer"]["side"] == "diffusers" and m["settings"]["families"] == ["sd3.5-medium"]
    code, report = _compare(capsys, dumps / "impl", dumps / "diffusers", "--strict")
    assert code == 0 and report["n_records"] == len(m["records"]) and report["first_divergence"] is None


def test_a_dump_differs_where_its_records_differ(dumps, capsys, tmp_path):
    """One record of a copy edited (block 1's image stream of one branch): the first divergence is there."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "edited"
    copy.mkdir()
    m = json.loads((dumps / "impl" / "manifest.json").read_text())
    tensors = load_file(str(dumps / "impl" / "records.safetensors"))
    entry = next(e for e in m["records"] if e["layer"] == "block.1.x" and e["branch"] == "cond")
    tensors[entry["name"]] = tensors[entry["name"]] + 1e-3
    save_file(tensors, str(copy / "records.safetensors"))
    (copy / "manifest.json").write_text(json.dumps(m))
    code, report = _compare(capsys, copy, dumps / "impl")
    assert code == 1 and report["n_failed"] == 1
    assert report["first_divergence"]["layer"] == "block.1.x" and report["first_divergence"]["branch"] == "cond"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["records"][3].update(shape=[9, 9]), "shape [9, 9], the stored tensor is"),
    (lambda m: m["records"][3].update(component="unet"), "component 'unet'"),
    (lambda m: m["records"][3].update(name="nope"), "name 'nope' is not a tensor"),
    (lambda m: m.update(version=9), "version 9"),
    (lambda m: m.update(scheme="diffusers"), "is not a diffusers module"),
    (lambda m: m["records"].append(dict(m["records"][0])), "produced twice"),
])
def test_a_malformed_dump_is_refused_by_name(dumps, capsys, tmp_path, edit, message):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dumps / "impl", bad)
    m = json.loads((bad / "manifest.json").read_text())
    edit(m)
    (bad / "manifest.json").write_text(json.dumps(m))
    assert main(["compare-dumps", str(bad), str(dumps / "impl")]) == 2
    err = capsys.readouterr().err
    assert str(bad / "manifest.json") in err and message in err and "Traceback" not in err


def test_dump_never_overwrites(dumps, capsys):
    before = (dumps / "impl" / "manifest.json").read_bytes()
    assert main(["dump", *RUN, "--out", str(dumps / "impl")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (dumps / "impl" / "manifest.json").read_bytes() == before


def test_onnx_runtime_mmdit_layer_by_layer(dumps, capsys, tmp_path, monkeypatch):
    """impl's MMDiT exported to ONNX and run by ONNX Runtime on each call's recorded inputs: every block's streams,
    the final layer and the output agree with impl's within 1e-4 (ONNX Runtime's float32 kernels round
    differently: 4e-6 measured on this model); a weight zeroed in block 1 before the export is found at block 1."""
    from parity import onnx_mmdit  # onnxruntime: the quickstart installs the onnx extra

    assert onnx_mmdit.main([str(dumps / "impl"), str(tmp_path / "ort")]) == 0
    capsys.readouterr()
    code, report = _compare(capsys, tmp_path / "ort", dumps / "impl", "--max-abs", "1e-4")
    depth = 3  # the embedded sd3.5-medium
    assert code == 0 and report["n_records"] == 2 * (3 + 2 * depth - 1 + 2)  # two branches, one step
    assert report["sources"][str(tmp_path / "ort")]["producer"]["name"] == "onnxruntime"

    from parity.sides import impl as impl_side

    load = impl_side.load_image_parts

    def faulty(*args):
        mmdit, vae, quantized = load(*args)
        mmdit.joint_blocks[1].x_block.mlp.fc2.weight.data.zero_()
        return mmdit, vae, quantized
    monkeypatch.setattr(impl_side, "load_image_parts", faulty)
    assert onnx_mmdit.main([str(dumps / "impl"), str(tmp_path / "ort-fault")]) == 0
    capsys.readouterr()
    code, report = _compare(capsys, tmp_path / "ort-fault", dumps / "impl", "--max-abs", "1e-4")
    failed = [r for r in report["records"] if not r["ok"]]
    assert code == 1 and failed[0]["layer"] == "block.1.x"
    assert all(r["ok"] for r in report["records"] if r["block"] is not None and r["block"] < 1)


def test_a_dump_as_the_reference_of_check_and_explain(tmp_path, capsys):
    """``--reference-dump``: impl checked against diffusers' dumped text records, and ``explain`` finding the two
    quirks impl was run with from the dump alone."""
    prompt = ["--text-only", "--prompt", "wow!! a cat"]
    assert main(["dump", *prompt, "--side", "diffusers", "--out", str(tmp_path / "ref")]) == 0
    capsys.readouterr()
    assert main(["check", *prompt, "--reference-dump", str(tmp_path / "ref"), "--quiet"]) == 0
    assert main(["check", *prompt, "--reference-dump", str(tmp_path / "ref"), "--flag", "clip_g_tokenizer=hf",
                 "--quiet"]) == 1
    assert "first divergence: #" in capsys.readouterr().out
    code = main(["explain", "--json", *prompt, "--reference-dump", str(tmp_path / "ref"),
                 "--flag", "clip_g_tokenizer=hf", "--flag", "t5_activation=gelu_tanh"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and sorted(map(tuple, out["found"])) == [("clip_g_tokenizer", "hf-bang-pad"),
                                                               ("t5_activation", "gelu_new")]


def test_records_of_every_layout_are_written_and_read_back(tmp_path):
    """Dumps are written one record at a time from each record's bytes: an expanded scalar (stride 0, which counts
    as contiguous), a transposed view and a spilled record come back equal."""
    import torch

    from parity import dump as D
    from parity import records as R

    rec = R.Recorder()
    tensors = {"a": torch.zeros(()).expand(1, 1, 3), "b": torch.arange(6.0).reshape(2, 3).t(), "c": torch.ones(1, 2)}
    for layer, t in tensors.items():
        rec.put(t, model="m", component="mmdit", layer=layer)
    side = rec.side()
    k = next(iter(side))
    side[k] = (side[k][0], R.SpillFile().put(side[k][1]))  # the first one spilled
    assert D.write(tmp_path / "d", side, {}, {"name": "test"}) == 3
    back, _ = D.read(tmp_path / "d")
    assert [f["layer"] for f, _ in back.values()] == list(tensors)
    for (f, t), want in zip(back.values(), tensors.values()):
        assert torch.equal(R.load(t), want), f["layer"]
