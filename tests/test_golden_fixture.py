"""The plugin's `golden` fixture used on impl itself (goldens in tests/goldens/, written with --golden-update):
no reference library needed."""
import torch

from impl import embedded
from impl.mmdit import MMDiT
from impl.text import encode_prompt, load_text_stack
from impl.weights import load_strict
from parity import flags as F
from parity.determinism import pinned


def test_embedded_conditioning(golden):
    with pinned(1):
        cond = encode_prompt(load_text_stack(), "a photo of a cat", F.settings(F.profile_values("diffusers")))
    golden.check("pooled", cond.pooled)
    golden.check("t5_ids", torch.tensor(cond.ids["t5"]))
    golden.check("context_row0", cond.context[0, 0])


def test_embedded_mmdit_forward(golden):
    c = embedded.MMDIT["sd3.5-medium"]
    model = MMDiT(c)
    load_strict(model, embedded.mmdit_weights("sd3.5-medium"), "tiny")
    g = torch.Generator().manual_seed(0)
    x, y, ctx = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 80, generator=g), torch.randn(1, 20, 96, generator=g)
    with pinned(1):
        golden.check("velocity", model(x, torch.tensor([500.0]), y, ctx))
