"""The committed goldens of the embedded default, verified by impl alone: this file needs no reference library
(it is what the impl-only environment runs). Bitwise values hold on the CPU they were recorded on; on another one
``verify`` must say so (exit 14, the CPU named) instead of blaming impl."""
import json
from pathlib import Path

import pytest

from parity import golden as G
from parity.cli import main

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def _recorded_here(name: str) -> bool:
    return json.loads((GOLDEN / name / "manifest.json").read_text())["environment"]["cpu"] == G.cpu()


def test_committed_sets_exist_and_are_small():
    sets = G.golden_sets(GOLDEN)
    assert {s.name for s in sets} == {"embedded-diffusers-float32", "embedded-sai-float32"}
    assert sum(p.stat().st_size for s in sets for p in s.iterdir()) < 4_000_000


@pytest.mark.parametrize("name", ["embedded-diffusers-float32", "embedded-sai-float32"])
def test_impl_matches_committed_goldens(name):
    verdict = G.verify(GOLDEN / name, with_reference=False)
    if _recorded_here(name):
        assert verdict.kind == "ok", verdict.lines
    else:  # another processor: impl's bits may differ, and the verdict must name the CPU, not impl
        assert verdict.kind in ("ok", "other_cpu") and (verdict.kind == "ok" or "cpu" in "".join(verdict.lines))


def test_injected_impl_change_fails_and_names_the_layer(monkeypatch, capsys):
    from impl import vae

    name = "embedded-diffusers-float32"
    forward = vae.AttnBlock.forward
    monkeypatch.setattr(vae.AttnBlock, "forward", lambda self, x: forward(self, x) * (1 + 2 ** -20))
    want = G.EXIT["impl"] if _recorded_here(name) else G.EXIT["other_cpu"]
    assert main(["verify", "--golden-dir", str(GOLDEN / name), "--impl-only"]) == want
    if _recorded_here(name):
        assert "component=vae layer=decoder.mid.attn_1 (" in capsys.readouterr().out
