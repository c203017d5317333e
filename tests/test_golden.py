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


def test_verify_markdown_summary(small, tmp_path, capsys):
    path = tmp_path / "summary.md"
    assert main(["verify", "--golden-dir", str(small), "--impl-only", "--markdown", str(path)]) == 0
    md = path.read_text()
    assert md.startswith("## sd3-parity verify: PASS") and "| `small` | ok | 0 |" in md and "impl only" in md


def test_verify_html_page(small, tmp_path, monkeypatch):
    from impl import clip

    forward = clip.MLP.forward
    monkeypatch.setattr(clip.MLP, "forward", lambda self, x: forward(self, x) * (1 + 2 ** -20))
    path = tmp_path / "verify.html"
    assert main(["verify", "--golden-dir", str(small), "--impl-only", "--html", str(path)]) == G.EXIT["impl"]
    html = path.read_text()
    assert "sd3-parity verify: <span class=\"fail\">exit 10</span>" in html and "<td>small</td>" in html
    assert "layer=layers.0.mlp" in html


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
    """The previous set still verifies; ``verify`` names what the killed writer left, the next ``record`` removes it
    and says so."""
    d = _copy(small, tmp_path / "small")
    before = (d / "manifest.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path), point], capture_output=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (d / "manifest.json").read_bytes() == before
    left = [p.name for p in G.leftovers(d)]
    kinds = [n.split("-")[0] for n in left]  # the new tensor file, placed before the kill at the manifest's rename
    assert kinds == ([".tensors"] if point == "tensors" else [".manifest", "tensors"]), left
    capsys.readouterr()
    assert main(["verify", "--golden-dir", str(d), "--impl-only"]) == 0
    assert f"leftovers of a killed record: {', '.join(left)}" in capsys.readouterr().out
    if point == "manifest":
        assert main(["record", "--golden-dir", str(tmp_path), "--prompt", "a cat", "--text-only", "--name", "small",
                     "--force"]) == 0
        out = capsys.readouterr().out
        assert all(n in out.split("removed what a killed record left: ")[1] for n in left)
        assert not G.leftovers(d) and main(["verify", "--golden-dir", str(d), "--impl-only"]) == 0


_SLOW = r"""
import os, sys, time
import parity.golden as G
from parity.cli import main
real = os.replace
def replace(src, dst):  # slowed at its renames
    time.sleep(3)
    return real(src, dst)
G.os.replace = replace
sys.exit(main(["record", "--golden-dir", sys.argv[1], "--prompt", "a dog", "--text-only", "--name", "small", "--force"]))
"""


def test_concurrent_records_on_one_name(small, tmp_path, capsys):
    """A second writer finds the first one (slowed at its renames) holding the set's lock: it exits 25 at once and
    changes nothing; the first finishes and the set verifies."""
    import time

    d = _copy(small, tmp_path / "small")
    slow = subprocess.Popen([sys.executable, "-c", _SLOW, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    lock = tmp_path / ".small.lock"
    for _ in range(600):
        if lock.is_file() and lock.read_text().strip() == str(slow.pid):
            break
        time.sleep(0.1)
    capsys.readouterr()
    assert main(["record", "--golden-dir", str(tmp_path), "--prompt", "a cat", "--text-only", "--name", "small",
                 "--force"]) == G.EXIT["busy"]
    err = capsys.readouterr().err
    assert f"another record (pid {slow.pid}) is writing this golden set; nothing was changed" in err
    out, errs = slow.communicate(timeout=300)
    assert slow.returncode == 0, errs.decode()[-2000:]
    assert "wrote" in out.decode()
    assert json.loads((d / "manifest.json").read_text())["settings"]["prompts"] == ["a dog"]
    assert main(["verify", "--golden-dir", str(d), "--impl-only"]) == 0


def test_a_failed_write_changes_nothing(small, tmp_path, monkeypatch, capsys):
    import errno

    import safetensors.torch

    d = _copy(small, tmp_path / "small")
    before = sorted((p.name, p.read_bytes()) for p in d.iterdir())

    def efbig(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(safetensors.torch, "save_file", efbig)
    assert main(["record", "--golden-dir", str(tmp_path), "--prompt", "a cat", "--text-only", "--name", "small",
                 "--force"]) == G.EXIT["write_failed"]
    assert "could not write the golden set (File too large); the previous set is unchanged" in capsys.readouterr().err
    assert sorted((p.name, p.read_bytes()) for p in d.iterdir()) == before


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".hidden", ""])
def test_set_names_stay_inside_the_golden_dir(tmp_path, name, capsys):
    assert main(["record", "--golden-dir", str(tmp_path / "g"), "--text-only", "--name", name]) == 2
    assert "a set name is letters, digits" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "g").exists()


def _edit(m, what):
    r = m["records"]
    if what == "sha256":
        r[0]["sha256"] = "0" * 64
    elif what == "no-records":
        r.clear()
    elif what == "deleted":
        del r[1]
    elif what == "duplicated":
        r.insert(1, dict(r[0]))
    elif what in ("shape", "shape+checksum"):
        r[0]["shape"] = r[0]["shape"] + [1]
    elif what in ("storage", "storage+checksum"):
        r[0]["storage"] = "sampled"
    elif what == "schema-true":
        m["schema_version"] = True
    elif what == "schema-0":
        m["schema_version"] = 0
    elif what == "passwd":
        m["tensor_file"] = "/etc/passwd"
    elif what == "settings-list":
        m["settings"] = []
    elif what == "threads-str":
        m["settings"]["threads"] = "1"
    elif what == "versions-list":
        m["versions"] = []
    elif what == "env-null":
        m["environment"] = None
    elif what == "steps-0":
        m["settings"]["steps"] = 0
    if what.endswith("+checksum"):
        m["records_sha256"] = G.records_sha256(r)


@pytest.mark.parametrize("what,message", [
    ("sha256", "the records do not match records_sha256"), ("no-records", "the records do not match records_sha256"),
    ("deleted", "records do not match"), ("duplicated", "records do not match"), ("shape", "records do not match"),
    ("storage", "records do not match"), ("shape+checksum", "does not match its stored tensor"),
    ("storage+checksum", "does not match its stored tensor"), ("schema-true", "schema_version True is not an integer"),
    ("schema-0", "schema_version 0 is older"), ("passwd", "tensor_file '/etc/passwd' is not a tensor file name"),
    ("settings-list", "settings is list, not dict"), ("threads-str", "settings threads of the wrong type"),
    ("versions-list", "versions is list, not dict"), ("env-null", "environment is NoneType, not dict"),
    ("steps-0", "settings: --steps 0: at least 1"),
])
def test_edited_manifests_are_malformed(small, tmp_path, what, message, monkeypatch, capsys):
    """Never 13 ("both changed") with max_abs 0, never 0: an edited manifest is exit 23 and says what is wrong;
    ``/etc/passwd`` is never opened."""
    import builtins

    d = _copy(small, tmp_path / "set")
    m = json.loads((d / "manifest.json").read_text())
    _edit(m, what)
    (d / "manifest.json").write_text(json.dumps(m))
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (_ for _ in ()).throw(AssertionError(f))
                        if str(f) == "/etc/passwd" else real_open(f, *a, **k))
    assert main(["verify", "--golden-dir", str(d)]) == G.EXIT["manifest_malformed"]
    out = capsys.readouterr()
    assert message in out.out + out.err and "Traceback" not in out.out + out.err


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


def test_record_keeps_the_noise_floor(tmp_path, capsys):
    assert main(["record", "--golden-dir", str(tmp_path), "--family", "sd3-medium", "--steps", "1", "--prompt", "a cat",
                 "--name", "n", "--noise-floor"]) == 0
    m = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert m["settings"]["noise_floor"] is True and all("noise" in e for e in m["records"])
    assert any(e["noise"]["max_abs"] > 0 for e in m["records"] if e["component"] == "vae")  # 1 vs 2 threads: VAE
    assert main(["verify", "--golden-dir", str(tmp_path / "n"), "--impl-only"]) == 0
