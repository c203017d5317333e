"""The committed goldens of the embedded default, verified by impl alone: this file needs no reference library
(it is what the impl-only environment runs)."""
from pathlib import Path

import pytest

from parity import golden as G
from parity.cli import main

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def test_committed_sets_exist_and_are_small():
    sets = G.golden_sets(GOLDEN)
    assert {s.name for s in sets} == {"embedded-diffusers-float32", "embedded-sai-float32"}
    assert sum(p.stat().st_size for s in sets for p in s.iterdir()) < 4_000_000


@pytest.mark.parametrize("name", ["embedded-diffusers-float32", "embedded-sai-float32"])
def test_impl_matches_committed_goldens(name):
    verdict = G.verify(GOLDEN / name, with_reference=False)
    assert verdict.kind == "ok", verdict.lines


def test_injected_impl_change_fails_and_names_the_layer(monkeypatch, capsys):
    from impl import vae

    forward = vae.AttnBlock.forward
    monkeypatch.setattr(vae.AttnBlock, "forward", lambda self, x: forward(self, x) * (1 + 2 ** -20))
    assert main(["verify", "--golden-dir", str(GOLDEN / "embedded-diffusers-float32"), "--impl-only"]) == 10
    assert "component=vae layer=decoder.mid.attn_1 (" in capsys.readouterr().out
