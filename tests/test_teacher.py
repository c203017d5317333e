"""Teacher forcing (``check --mode both``): faults injected into impl are introduced where they live and only there;
every record downstream of a fault inherits its error (it fails propagated, its local error is nil)."""
import pytest
import torch

from parity.run import Spec, check

SPEC = Spec(prompts=("a cat",), families=("sd3.5-medium",), steps=2, mode="both")


class ReferenceCache(dict):
    """The reference's records, computed once for every fault; impl's are computed each time (with the fault)."""

    def __setitem__(self, key, value):
        if key[0] != "impl":
            super().__setitem__(key, value)


@pytest.fixture(scope="module")
def cache():
    return ReferenceCache()


def _introduced(report) -> set[tuple[str, str]]:
    return {(r["component"], r["layer"]) for r in report.introduced}


def _inherit(report) -> int:
    return sum(1 for r in report.failures if r.get("local", {}).get("ok"))


def test_without_a_fault_every_local_record_is_bitwise(cache):
    """Every record has a local value (a unit or a source) and each is bitwise equal to the reference: the units
    reproduce impl's own computation, batch and dtype included."""
    report = check(SPEC, cache)
    assert report.records and not report.failures
    assert all(r["local"]["bitwise_equal"] for r in report.records), [r["layer"] for r in report.records
                                                                      if not r["local"]["bitwise_equal"]][:5]


def test_a_vae_module_fault_is_introduced_there_only(cache, monkeypatch):
    from impl import vae

    forward = vae.AttnBlock.forward
    monkeypatch.setattr(vae.AttnBlock, "forward", lambda self, x: forward(self, x) * 1.001)
    report = check(SPEC, cache)
    assert _introduced(report) == {("vae", "decoder.mid.attn_1")}
    assert report.first_divergence["layer"] == "decoder.mid.attn_1"
    downstream = {r["layer"] for r in report.failures} - {"decoder.mid.attn_1"}
    assert {"decoder.mid.block_2", "decoder.conv_out", "image_uint8"} <= downstream
    assert _inherit(report) == len(report.failures) - 1


def test_a_vae_latent_shift_fault_is_introduced_at_the_decoder_input(cache, monkeypatch):
    from impl import vae

    monkeypatch.setattr(vae.VAE, "latent_out", lambda self, z: z / self.config.scaling_factor
                        + self.config.shift_factor + 0.01)
    report = check(SPEC, cache)
    assert _introduced(report) == {("vae", "decoder.conv_in")}
    assert _inherit(report) > 10


def test_a_final_layer_fault_is_introduced_at_each_call_and_not_in_the_sampler(cache, monkeypatch):
    """The final layer is wrong at every model call: each call's ``final`` introduces error, the sampler's steps
    (run on the reference's model outputs) and the next step's blocks (on the reference's inputs) add none."""
    from impl import mmdit

    forward = mmdit.FinalLayer.forward
    monkeypatch.setattr(mmdit.FinalLayer, "forward", lambda self, x, c, cast=True: forward(self, x, c, cast) * 0.999)
    report = check(SPEC, cache)
    assert _introduced(report) == {("mmdit", "final")}
    assert {(r["step"], r["branch"]) for r in report.introduced} == {(0, "cond"), (0, "uncond"), (1, "cond"),
                                                                      (1, "uncond")}
    failed = {(r["component"], r["layer"]) for r in report.failures}
    assert {("sampler", "velocity"), ("sampler", "latent"), ("mmdit", "block.0.x"), ("vae", "decoder.conv_out")} <= failed


def test_a_timestep_embedding_fault_stays_in_the_embedding_stage(cache, monkeypatch):
    from impl import mmdit

    embed = mmdit.timestep_embedding
    monkeypatch.setattr(mmdit, "timestep_embedding", lambda t, dim, max_period=10000.0: embed(t, dim, max_period / 2))
    report = check(SPEC, cache)
    assert _introduced(report) == {("mmdit", "t_embedder"), ("mmdit", "c")}  # c = t_embedder + y_embedder, one unit
    assert ("mmdit", "block.0.x.modulation") in {(r["component"], r["layer"]) for r in report.failures}


def test_a_t5_bucket_fault_is_introduced_at_the_bias_table_only(cache, monkeypatch):
    """A wrong relative-position bucket changes T5's bias table; every block, fed the reference's table, is
    exact, so the text stack's only introducing record is the table itself."""
    from impl import t5

    bucket = t5.relative_bucket
    monkeypatch.setattr(t5, "relative_bucket", lambda rel, n, d: bucket(rel, n, d * 2))
    report = check(Spec(prompts=("a photo of a cat on a long red sofa in a sunny room",), text_only=True, mode="both"),
                   cache)
    assert _introduced(report) == {("t5", "relative_attention_bias")}
    assert ("t5", "block.0") in {(r["component"], r["layer"]) for r in report.failures}


def test_a_gelu_fault_is_introduced_in_every_block_that_runs_it(cache, monkeypatch):
    """The MLP's GELU without the tanh approximation: error is introduced at each MLP's output (and its block's
    output, the same unit), never at attention or outside the transformer."""
    from impl import mmdit

    monkeypatch.setattr(mmdit.Mlp, "forward", lambda self, x: self.fc2(torch.nn.functional.gelu(self.fc1(x))))
    report = check(SPEC, cache)
    layers = {layer for _, layer in _introduced(report)}
    assert {c for c, _ in _introduced(report)} == {"mmdit"}
    assert "block.0.x.mlp.fc2" in layers
    assert all(layer.endswith(("mlp.fc2", ".x", ".context")) for layer in layers), layers


def test_a_guidance_fault_is_introduced_in_the_sampler_step(cache, monkeypatch):
    from impl import sampling

    monkeypatch.setattr(sampling, "guide", lambda uncond, cond, scale: uncond + (cond - uncond) * (scale + 0.5))
    report = check(SPEC, cache)
    assert _introduced(report) == {("sampler", "velocity"), ("sampler", "latent")}
    first = [r for r in report.introduced if r["step"] == 0]
    assert first[0]["layer"] == "velocity"


def test_teacher_forced_mode_alone(cache, monkeypatch):
    """``--mode teacher-forced`` compares the local records only: its failures are the introducing records."""
    from dataclasses import replace

    from impl import vae

    forward = vae.AttnBlock.forward
    monkeypatch.setattr(vae.AttnBlock, "forward", lambda self, x: forward(self, x) * 1.001)
    report = check(replace(SPEC, mode="teacher-forced"), {})
    assert {(r["component"], r["layer"]) for r in report.failures} == {("vae", "decoder.mid.attn_1")}
    assert report.to_json()["introduced"] == [r["seq"] for r in report.failures]


def test_progress_names_each_stage_on_a_terminal(cache, monkeypatch):
    """On a terminal the run's stages are a progress bar on stderr (nothing is drawn elsewhere: tqdm's default)."""
    import io
    import sys

    from parity.run import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    check(SPEC, cache, Progress())
    shown = err.getvalue()
    for stage in ("impl text", "impl embedded-sd3.5-medium", "diffusers text", "diffusers embedded-sd3.5-medium",
                  "teacher forcing", "5/5"):
        assert stage in shown, stage


def test_the_report_gives_peak_memory_and_seconds_per_stage(cache):
    report = check(SPEC, cache)
    stages = [what for what, _ in report.resources["seconds"]]
    assert stages[:2] == ["impl text", "impl embedded-sd3.5-medium"] and stages[-2:] == ["teacher forcing", "comparison"]
    assert all(t >= 0 for _, t in report.resources["seconds"]) and report.resources["peak_rss_mb"] > 100
    assert report.to_json()["resources"] == report.resources
