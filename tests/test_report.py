"""The report's forms: the verdict first, the table's columns, --quiet, the Markdown summary."""
import re

import pytest
import torch

from parity.cli import main
from parity.metrics import compare
from parity.report import Report, format_table, markdown


def _report(records):
    r = Report("m", "diffusers", "diffusers", "float32", {}, 1, 0)
    r.add_pairs(*records)
    return r


def _side(**tensors):
    return {k: ({"model": "m", "prompt": 0, "component": "clip-l", "layer": k, "step": None, "branch": None,
                 "seq": i}, t) for i, (k, t) in enumerate(tensors.items())}


def test_ulp_is_not_shown_across_a_sign_flip():
    """A sign flip is ~2e9 ULPs in float32: the table says 'sign' and the verdict counts the flips instead."""
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0])
    m = compare(a, b)
    assert m["sign_flips"] == 1 and m["max_ulp"] > 2 ** 30
    report = _report((_side(x=a, y=a + 1e-7), _side(x=b, y=a)))
    text = format_table(report, ["p"])
    row = next(line for line in text.splitlines() if line.strip().startswith("0 "))
    assert re.search(r"\s-?\d\.\d{6}\s+sign\s+NO", row), row
    assert "1 sign flips" in text.splitlines()[1] and text.startswith("2 records, 0 within tolerance, 2 exceed it")


def test_quiet_and_markdown(tmp_path, capsys):
    path = tmp_path / "summary.md"
    assert main(["check", "--text-only", "--prompt", "a cat", "--flag", "clip_l_pad=0", "--quiet",
                 "--markdown", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("exceed it") and out[1].startswith("first divergence: #") and out[1].endswith("ulp 49407)")
    assert out[2] == "cause: tokenization (ids differ)" and len(out) == 3
    md = path.read_text()
    assert md.startswith("## sd3-parity check: FAIL") and "| clip-l |" in md and "| weights clip-l | 53 | 53 | 0 | 0 |" in md
    assert "First divergence: `#" in md and "clip-l input_ids` (max abs 4.94e+04" in md
    assert "<summary>what each side read</summary>" in md and "text_encoder/model.safetensors" in md


def test_markdown_of_a_passing_run():
    md = markdown(_report((_side(x=torch.ones(2)), _side(x=torch.ones(2)))))
    assert md.startswith("## sd3-parity check: PASS") and "First divergence: none" in md


def test_noise_floor_tells_precision_from_op_semantics(monkeypatch, capsys):
    """The reference's own jitter (diffusers on 1 and on 2 threads) per record: an attention-order change at block 0
    is above it (op semantics, where the jitter is 0); a 1-ULP nudge of impl's last VAE up-block output is within
    the jitter the thread count alone causes there (precision), and --tolerance noise accepts it."""
    import json

    import torch

    argv = ["check", "--family", "sd3-medium", "--steps", "2", "--prompt", "a cat", "--json", "--noise-floor"]
    assert main([*argv, "--flag", "attention_order=context_first"]) == 1
    out = json.loads(capsys.readouterr().out)
    fd = next(r for r in out["records"] if r["seq"] == out["first_divergence"]["seq"])
    assert fd["layer"] == "block.0.context.attn.proj" and fd["noise"]["max_abs"] == 0.0
    assert fd["cause"] == "op semantics (above the reference's own jitter)"

    from parity.sides import impl as side

    load = side.load_image_parts

    def nudged(*args):  # impl's VAE with the input of the decoder's conv_out one ULP up
        mmdit, vae, quantized = load(*args)
        vae.decoder.conv_out.register_forward_pre_hook(
            lambda _m, args: (args[0].view(torch.int32).add(1).view(torch.float32),))
        return mmdit, vae, quantized
    monkeypatch.setattr(side, "load_image_parts", nudged)
    code = main(argv)
    out = json.loads(capsys.readouterr().out)
    bad = [r for r in out["records"] if not r["bitwise_equal"]]
    assert code == 1 and bad and all(r["component"] == "vae" for r in bad)
    assert {r["cause"] for r in bad if r["noise"]["max_abs"] > 0} == {"precision (within the reference's own jitter)"}
    assert main([*argv, "--tolerance", "noise"]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_counts_of_equal_tensors_take_the_fast_path(dtype):
    """Bit-identical tensors take the fast path: an Inf or NaN found by ``all_finite`` (at any place of a vector,
    so in every lane of a vectorized reduction and in its tail) gives the same counts as isnan / isinf, for every
    float dtype."""
    from parity.metrics import all_finite, compare

    x = torch.linspace(-3, 3, 1000, dtype=torch.float64).to(dtype)
    assert all_finite(x) and all_finite(x[:0]) and compare(x, x.clone())["nan"] == [0, 0]
    for bad, field in ((float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "inf")):
        y = x.clone()
        y[[3, 500]] = bad
        m = compare(y, y.clone())
        assert not all_finite(y) and m["bitwise_equal"] and m[field] == [2, 2]
    assert all_finite(torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min], dtype=dtype))
    assert all_finite(x[:1].reshape(())) and all_finite(x.reshape(10, 100).t())  # a scalar, a strided view
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in range(67):  # 64 + 3: past the widest vector of 2-byte values
            y = x[:67].clone()
            y[i] = bad
            assert not all_finite(y) and not all_finite(y[i:].flip(0)), (bad, i)
