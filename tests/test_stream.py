"""Streamed runs (``check --stream``): each side's text layers and MMDiT blocks paged in one at a time from the
memory-mapped files give exactly the records of the models loaded whole."""
from dataclasses import replace

import pytest
import torch

from parity import records as R
from parity.cli import main
from parity.run import Spec, check, execute, resolve


def side_records(spec: Spec) -> dict:
    run = resolve(spec)
    return {name: execute(run, name)[0] for name in ("impl", "diffusers")}, run


@pytest.mark.parametrize("options", [
    {},  # float32, every embedded family
    {"dtype": "float16", "families": ("sd3.5-large",), "steps": 3},  # T5's wo kept in float32, as transformers does
], ids=["float32", "float16"])
def test_streamed_records_are_the_in_memory_records(options):
    """Both sides, record for record and bit for bit (fields, execution order, tensors), streamed or not; and the
    streamed run held at most one unit of each model at a time."""
    spec = Spec(**options)
    whole, _ = side_records(spec)
    streamed, run = side_records(replace(spec, stream=True))
    for name in ("impl", "diffusers"):
        a, b = whole[name], streamed[name]
        assert list(a) == list(b)
        for k in a:
            assert a[k][0] == b[k][0] and torch.equal(R.load(a[k][1]), R.load(b[k][1])), (name, k)
    paged = [n for n in run.notes if n.startswith("streamed ")]
    assert len(paged) == 2 * (3 + len(run.models)) and all(n.endswith("at most 1 resident") for n in paged)


def test_a_changed_block_weight_is_found_at_that_block(monkeypatch):
    """One block's weight changed on impl's side only (the file it streams from read differently): the first
    divergence is that weight's record, and the first activation that differs is in that block."""
    from parity import stream

    get = stream.Weights.get
    target = "model.diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"

    def changed(self, name):
        t = get(self, name)
        return t * (1 + 2 ** -10) if name == target else t
    monkeypatch.setattr(stream.Weights, "get", changed)
    report = check(Spec(stream=True, families=("sd3.5-medium",), prompts=("a cat",)))
    assert report.first_divergence["layer"] == "weight:joint_blocks.1.x_block.attn.qkv.weight"
    first = next(r for r in report.records if not r["bitwise_equal"] and not r["layer"].startswith("weight:"))
    assert first["component"] == "mmdit" and first["block"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--profile", "sai"], "the sai reference is not streamed yet"),
    (["--checkpoint", "x.safetensors"], "a single file is not streamed yet"),
    (["--mode", "both"], "compare propagated only"),
    (["--flag", "text_encoder_storage=float16"], "paged in the dtype they compute in"),
])
def test_what_is_not_streamed_is_refused(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"")
    assert main(["check", "--stream", *argv]) == 2
    assert message in capsys.readouterr().err
