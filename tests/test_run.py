"""The run path: options checked before any work, exit codes, records in execution order, faults located at the
step and component where they live, reference sides reused across impl variants."""
import json
from pathlib import Path

import pytest
import torch

from parity import flags as F
from parity.cli import main
from parity.run import Spec, check, execute, resolve

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parent.parent
ONE = ["--prompt", "a cat", "--family", "sd3-medium"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any side runs: the option must be refused before."""
    def refuse(*a, **k):
        raise AssertionError("a side ran before the options were checked")
    monkeypatch.setattr("parity.run.execute", refuse)


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads 0: between 1 and 1024"),
    (["--steps", "0"], "--steps 0: at least 1"),
    (["--strength", "1.5"], "--strength 1.5: in (0, 1]"),
    (["--max-ulp", "-1"], "--max-ulp -1: at least 0"),
    (["--shift", "nan"], "--shift nan: a finite value > 0"),
    (["--guidance", "inf"], "--guidance inf: a finite value >= 0"),
    (["--seed", "-1"], "--seed -1: between 0 and"),
    (["--slg", "1"], "--slg with 2 steps: the skip-layer window"),
    (["--slg", "99", "--steps", "6"], "--slg 99: embedded-sd3-medium has 2 blocks"),
    (["--size", "64x40"], "width 40 must be a positive multiple of 16"),
    (["--size", "1024x64"], "height 1024 gives 64 patches"),
    (["--model", "{model}", "--family", "sd3-medium"], "--family names embedded families"),
    (["--flag", "sampler=fast"], "--flag sampler: 'fast' is not one of"),
    (["--flag", "uint8=round", "--flag", "uint8=truncate"], "--flag given twice"),
    (["--checkpoint", "/nonexistent.safetensors"], "--checkpoint /nonexistent.safetensors: no such file"),
    (["--prompt", "a dog", "--prompt-t5", "a bird"], "give exactly one --prompt"),
    (["--profile", "sai", "--prompt-clip-g", "a dog"], "the SD3.5 code encodes one prompt for the three encoders"),
    (["--prompt-t5", "", "--empty-padding", "none"], "--empty-padding none: CLIPTextEncodeSD3's unpadded"),
])
def test_bad_options_are_refused_before_any_work(args, message, model_dir, no_work, capsys):
    args = [a.format(model=model_dir) for a in args]
    family = [] if "--model" in args or "--checkpoint" in args else ["--family", "sd3-medium"]
    assert main(["check", "--prompt", "a cat", *family, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_internal_errors_have_their_own_exit_code(monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr("parity.sides.impl.ImplSide.text", broken)
    assert main(["check", "--prompt", "a cat", "--text-only"]) == 4
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: boom (rerun with --debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "check", "--prompt", "a cat", "--text-only"])


def test_unsupported_scheduler_options_are_refused(tmp_path, capsys):
    import shutil

    from parity.embedded import model_dir

    d = tmp_path / "m"
    shutil.copytree(model_dir("sd3-medium"), d)
    cfg = json.loads((d / "scheduler/scheduler_config.json").read_text())
    (d / "scheduler/scheduler_config.json").write_text(json.dumps({**cfg, "use_dynamic_shifting": True}))
    assert main(["check", "--model", str(d), "--prompt", "a cat"]) == 3
    assert "use_dynamic_shifting = True is not reproduced by impl" in capsys.readouterr().err


def test_quirk_catalogue_is_generated_from_the_flags():
    assert (ROOT / "QUIRKS.md").read_text() == F.catalogue(), "regenerate: sd3parity flags --markdown > QUIRKS.md"
    for flag in F.FLAGS:
        assert f"`{flag.name}`" in F.catalogue() and flag.provenance


@pytest.fixture(scope="module")
def reference():
    """diffusers' records of one small run, computed once and compared with each faulty impl below."""
    run = resolve(Spec(prompts=("a cat",), families=("sd3-medium",), steps=3))
    return run, execute(run, "diffusers")


def _first(run, ref, monkeypatch, target, fault):
    from parity.run import compare

    monkeypatch.setattr(target, fault)
    fd = compare(run, execute(run, "impl"), ref).first_divergence
    return None if fd is None else (fd["component"], fd["layer"], fd["step"], fd["branch"])


def test_records_follow_execution_order(reference):
    run, (ref, _) = reference
    seqs, steps = [f["seq"] for f, _ in ref.values()], [f["step"] for f, _ in ref.values() if f["step"] is not None]
    assert seqs == list(range(len(ref))) and steps == sorted(steps)
    order = [(f["component"], f["layer"], f["step"], f["branch"]) for f, _ in ref.values()]
    for step in range(3):  # per step: each call's inputs, its layers, its raw output, then guidance and the update
        i = order.index(("sampler", "input.latent_in", step, "uncond"))
        assert i < order.index(("mmdit", "block.0.context.attn.k", step, "uncond")) \
            < order.index(("mmdit", "block.0.x.attn.proj", step, "uncond")) \
            < order.index(("mmdit", "output", step, "cond")) < order.index(("sampler", "velocity", step, None)) \
            < order.index(("sampler", "latent", step, None))


@pytest.mark.parametrize("target, fault, first", [
    # classifier-free guidance: the guided velocity of step 0, not the next step's input
    ("impl.sampling.guide", lambda u, c, s: u + (c - u) * (s + 2 ** -10), ("sampler", "velocity", 0, None)),
    # the update rule: the latent after step 0
    ("impl.sampling._update", lambda rule, space, x, g, sig, i, st, old: (x + (sig[i + 1] - sig[i]) * g * 1.001, None),
     ("sampler", "latent", 0, None)),
    # unpatchify, inside the MMDiT: the model output of the first call
    ("impl.mmdit.MMDiT.unpatchify", lambda self, out, h, w: torch.flip(
        out.reshape(out.shape[0], h // 2, w // 2, 2, 2, 16).permute(0, 5, 1, 3, 2, 4).reshape(out.shape[0], 16, h, w),
        dims=(-1,)), ("mmdit", "output", 0, "uncond")),
    # the shift formula: the schedule, before any call
    ("impl.sampling.diffusers_schedule", lambda steps, shift: (torch.linspace(1, 0, steps + 1), None),
     ("sampler", "sigmas", None, None)),
])
def test_injected_faults_are_located_where_they_live(reference, monkeypatch, target, fault, first):
    run, ref = reference
    assert _first(run, ref, monkeypatch, target, fault) == first


def test_a_context_stream_fault_is_not_blamed_on_the_image_stream(reference, monkeypatch):
    from parity.sides import impl as side

    run, ref = reference
    load = side.load_image_parts

    def faulty(*args):
        mmdit, vae, quantized = load(*args)
        mmdit.joint_blocks[0].context_block.attn.k.register_forward_hook(lambda m, a, out: out * (1 + 2 ** -12))
        return mmdit, vae, quantized
    assert _first(run, ref, monkeypatch, "parity.sides.impl.load_image_parts", faulty) == \
        ("mmdit", "block.0.context.attn.k", 0, "uncond")


def test_a_reference_side_is_computed_once_for_many_impl_variants(monkeypatch):
    from parity.sides.diffusers import DiffusersSide

    calls = []
    image = DiffusersSide.image
    monkeypatch.setattr(DiffusersSide, "image", lambda self, *a: calls.append(1) or image(self, *a))
    cache = {}
    for flag in ({}, {"uint8": "truncate"}, {"qkv_fusion": "fused"}):
        check(Spec(prompts=("a cat",), families=("sd3-medium",), overrides=tuple(flag.items())), cache)
    assert len(calls) == 1


def test_a_side_that_covers_part_of_the_pipeline_is_compared_on_that_part(reference):
    """A side may produce only some components (a dump of an outside implementation, say): impl's other records
    are left out of the comparison, and the report says so."""
    from parity.run import compare

    run, (ref, sources) = reference
    text_only = ({k: v for k, v in ref.items() if v[0]["component"] not in ("mmdit", "sampler", "vae")},
                 {**sources, "covers": ["clip-g", "clip-l", "conditioning", "t5"]})
    report = compare(run, execute(run, "impl"), text_only)
    assert report.first_divergence is None and not report.failures
    assert {r["component"] for r in report.records} == {"clip-l", "clip-g", "t5", "conditioning"}
    assert "diffusers produces clip-g, clip-l, conditioning, t5 only" in report.notes[-1]
