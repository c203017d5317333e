"""Golden sets: record, verify, the classification of what changed, damaged sets, and atomic writes."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from parity import golden as G
from parity.cli import main

pytest.importorskip("diffusers")
SMALL = ["--prompt", "a cat", "--family", "sd3-medium", "--name", "small"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    assert main(["record", "--golden-dir", str(root), *SMALL]) == 0
    return root / "small"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_record_refuses_to_replace_a_set_without_force(small, tmp_path, capsys):
    d = _copy(small, tmp_path / "small")
    before = (d / "manifest.json").read_bytes()
    assert main(["record", "--golden-dir", str(tmp_path), "--prompt", "a cat", "--text-only", "--name", "small"]) == 2
    assert "a golden set exists; --force replaces it" in capsys.readouterr().err
    assert (d / "manifest.json").read_bytes() == before


def test_record_then_verify(small, capsys):
    m = json.loads((small / "manifest.json").read_text())
    assert [e["seq"] for e in m["records"]] == list(range(len(m["records"])))  # the reference's execution order
    assert m["environment"]["cpu"]["capability"] and m["settings"]["families"] == ["sd3-medium"]
    assert m["schema_version"] == G.SCHEMA_VERSION and m["environment"]["threads"] == 1
    assert {"torch", "diffusers", "transformers", "tokenizers"} <= set(m["versions"])
    assert {e["storage"] for e in m["records"]} == {"full", "sampled"}
    assert main(["verify", "--golden-dir", str(small)]) == 0
    assert main(["verify", "--golden-dir", str(small), "--impl-only"]) == 0
    assert "impl only" in capsys.readouterr().out


def test_impl_change_is_named(small, monkeypatch, capsys):
    from impl import clip

    forward = clip.MLP.forward
    monkeypatch.setattr(clip.MLP, "forward", lambda self, x: forward(self, x) * (1 + 2 ** -20))
    assert main(["verify", "--golden-dir", str(small), "--impl-only"]) == G.EXIT["impl"]
    out = capsys.readouterr().out
    assert "impl: first difference at model=embedded-default prompt=0 component=clip-l layer=layers.0.mlp (" in out


def test_reference_drift_is_named(small, monkeypatch, capsys):
    from transformers.models.clip import modeling_clip

    real = G.versions()
    monkeypatch.setattr(G, "versions", lambda: {**real, "transformers": "9.9.9"})
    forward = modeling_clip.CLIPMLP.forward
    monkeypatch.setattr(modeling_clip.CLIPMLP, "forward", lambda self, x: forward(self, x) * (1 + 2 ** -20))
    assert main(["verify", "--golden-dir", str(small)]) == G.EXIT["reference"]
    out = capsys.readouterr().out
    assert f"reference versions: transformers {real['transformers']} -> 9.9.9" in out
    assert "reference: first difference at model=embedded-default prompt=0 component=clip-l" in out


def test_thread_count_is_an_environment_change(small, capsys):
    assert main(["verify", "--golden-dir", str(small), "--threads", "2"]) == G.EXIT["environment"]
    out = capsys.readouterr().out
    assert "environment: threads 1 -> 2" in out and "component=vae layer=decoder." in out  # QUIRKS: oneDNN 1x1 conv


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, kind, message", [
    ("flip", "tensor_damaged", "sha256 differs from the manifest's; damaged records: "),
    ("truncate", "tensor_file", "truncated"),
    ("no-manifest", "manifest_missing", "manifest.json: missing"),
    ("bad-json", "manifest_malformed", "not valid JSON"),
    ("no-records", "manifest_malformed", "missing keys ['records']"),
    ("newer", "newer_schema", f"schema_version {G.SCHEMA_VERSION + 1} is newer"),
    ("older", "manifest_malformed", f"schema_version {G.SCHEMA_VERSION - 1} is older"),
    ("unknown-setting", "manifest_malformed", "settings has unknown keys ['model_dir']"),
])
def test_damaged_sets(small, tmp_path, damage, kind, message, capsys):
    d = _copy(small, tmp_path / "set")
    tensors = next(d.glob("tensors-*.safetensors"))
    manifest = d / "manifest.json"
    if damage == "flip":  # a byte inside the first full tensor's data
        m = json.loads(manifest.read_text())
        first = next(e["key"] for e in m["records"] if e["storage"] == "full")
        header = int.from_bytes(tensors.read_bytes()[:8], "little")
        offsets = json.loads(tensors.read_bytes()[8: 8 + header])[first]["data_offsets"]
        _flip(tensors, 8 + header + offsets[0])
        message += first
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif damage == "no-manifest":
        manifest.unlink()
    elif damage == "bad-json":
        manifest.write_text('{"schema": ')
    else:
        m = json.loads(manifest.read_text())
        if damage == "no-records":
            m.pop("records")
        elif damage == "unknown-setting":
            m["settings"]["model_dir"] = None  # schema 1's name for --model
        else:
            m["schema_version"] = G.SCHEMA_VERSION + (1 if damage == "newer" else -1)
        manifest.write_text(json.dumps(m))
    assert main(["verify", "--golden-dir", str(d)]) == G.EXIT[kind]
    out = capsys.readouterr()
    assert message in out.out + out.err and "Traceback" not in out.out + out.err


_KILLER = r"""
import os, signal, sys
import safetensors.torch, parity.golden as G
from parity.cli import main
point = sys.argv[2]
if point == "tensors":  # die half way through writing the new tensor file
    def save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    safetensors.torch.save_file = save_file
else:  # die after the new tensor file is in place, before the manifest is replaced
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith("manifest.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
main(["record", "--golden-dir", sys.argv[1], "--prompt", "another prompt", "--text-only", "--name", "small",
      "--force"])
"""


@pytest.mark.parametrize("point", ["tensors", "manifest"])
def test_sigkill_during_record_leaves_the_previous_set(small, tmp_path, point, capsys):
    d = _copy(small, tmp_path / "small")
    before = (d / "manifest.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path), point], capture_output=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (d / "manifest.json").read_bytes() == before
    assert main(["verify", "--golden-dir", str(d), "--impl-only"]) == 0


def test_named_model_set_and_both_changed(tmp_path, capsys):
    """A set for a named directory; then its transformer weights change in place (same header, so the file
    fingerprint stays): impl and the reference both move, in the recorded environment (exit 13)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from parity.embedded import model_dir

    d = tmp_path / "model"
    shutil.copytree(model_dir("sd3-medium"), d)
    assert main(["record", "--golden-dir", str(tmp_path / "g"), "--model", str(d), "--prompt", "a cat",
                 "--name", "m"]) == 0
    m = json.loads((tmp_path / "g/m/manifest.json").read_text())
    assert m["model"]["name"] == str(d) and "transformer/diffusion_pytorch_model.safetensors" in m["model"]["files"]
    assert main(["verify", "--golden-dir", str(tmp_path / "g/m")]) == 0
    f = d / "transformer/diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    state["proj_out.bias"] = state["proj_out.bias"] + 1.0
    save_file(state, str(f))
    capsys.readouterr()
    assert main(["verify", "--golden-dir", str(tmp_path / "g/m")]) == G.EXIT["both"]
    assert "component=mmdit layer=final" in capsys.readouterr().out


def test_another_cpu_is_told_apart_from_an_impl_change(small, monkeypatch, capsys):
    """Another processor rounds every side's kernels its own way (simulated: SDPA nudged for all, the CPU renamed):
    exit 14, and the live comparison on this machine says impl still agrees with the reference. An impl change
    on that machine is still exit 10."""
    real_cpu, sdpa = G.cpu(), torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(G, "cpu", lambda: {**real_cpu, "model": "another processor"})
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa(*a, **k) * (1 + 2 ** -20))
    assert main(["verify", "--golden-dir", str(small)]) == G.EXIT["other_cpu"]
    out = capsys.readouterr().out
    assert "environment: cpu" in out and "live on this machine: impl vs diffusers: every record" in out
    from impl import clip

    forward = clip.MLP.forward
    monkeypatch.setattr(clip.MLP, "forward", lambda self, x: forward(self, x) * (1 + 2 ** -20))
    assert main(["verify", "--golden-dir", str(small)]) == G.EXIT["impl"]
    assert "live on this machine: impl vs diffusers: model=embedded-default prompt=0 component=clip-l" in \
        capsys.readouterr().out
