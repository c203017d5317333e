"""impl MMDiT / MMDiT-X and VAE against diffusers, every captured point, on the embedded tiny models."""
import pytest
import torch

from impl import embedded
from impl.mmdit import MMDiT, MMDiTOptions
from impl.vae import VAE
from impl.weights import WeightError, load_strict
from parity import layermap as LM
from parity import naming as N
from parity.convert import diffusers_to_sai, mmdit_rules, sai_to_diffusers
from parity.determinism import own_storage, pinned
from parity.embedded import model_dir

diffusers = pytest.importorskip("diffusers")


def _inputs(c, batch=2, h=8, w=12):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, c.in_channels, h, w, generator=g), torch.tensor([700.5, 3.25][:batch]),
            torch.randn(batch, c.pooled_dim, generator=g), torch.randn(batch, 333, c.context_dim, generator=g))


def _pair(family, options=MMDiTOptions()):
    """impl from the generated weights; diffusers' own class from the embedded pipeline's files (its own loader)."""
    c, w = embedded.MMDIT[family], embedded.mmdit_weights(family)
    impl = MMDiT(c, options)
    load_strict(impl, w, family)
    ref = own_storage(diffusers.SD3Transformer2DModel.from_pretrained(model_dir(family) / "transformer").eval())
    return c, impl, ref


def _run(c, impl, ref, inputs):
    rows = N.mmdit_rows(c.depth, c.qk_norm, c.dual_attention_layers)
    pi, pr = N.points(rows, "impl"), N.points(rows, "diffusers")
    N.check_coverage(pi, impl, N.MMDIT_SKIP["impl"], "impl mmdit")
    N.check_coverage(pr, ref, N.MMDIT_SKIP["diffusers"], "diffusers mmdit")
    si, sr = {}, {}
    x, t, y, ctx = inputs
    clock = iter(range(10 ** 6)).__next__
    with LM.capture(impl, pi, si, clock), LM.capture(ref, pr, sr, clock):
        a = impl(x, t, y, ctx)
        b = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    unequal = [k for k in pi if not torch.equal(si[k][0][1], N.apply_transform(pr[k].transform, sr[k][0][1]))]
    return a, b, unequal, len(pi)


@pytest.mark.parametrize("family", list(embedded.MMDIT))
def test_mmdit_every_point_bitwise(family):
    with pinned(1):
        c, impl, ref = _pair(family)
        a, b, unequal, n = _run(c, impl, ref, _inputs(c))
    assert n > 30 and unequal == [] and torch.equal(a, b)


def test_sai_op_order_diverges_at_the_first_joint_attention():
    """QUIRKS M3: the SD3.5 reference's [context, image] order changes the joint attention by ulps; the first point
    after it (the image stream's output projection) is the first divergence. The fused qkv GEMM (M4) happens to be
    bitwise equal to three GEMMs at this size, so q, k and v still agree."""
    with pinned(1):
        c, impl, ref = _pair("sd3-medium", MMDiTOptions(attention_order="context_first", qkv="fused"))
        a, b, unequal, _ = _run(c, impl, ref, _inputs(c))
    assert unequal[0] == "block.0.x.attn.proj"
    assert 0 < (a - b).abs().max() < 1e-4


def test_round_trip_and_strict_errors():
    c, w = embedded.MMDIT["sd3.5-medium"], embedded.mmdit_weights("sd3.5-medium")
    back = diffusers_to_sai(sai_to_diffusers(w, c), c)
    assert back.keys() == w.keys() and all(torch.equal(back[k], w[k]) for k in w)
    assert len({r.sai for r in mmdit_rules(c)}) == len(w)
    broken = dict(w)
    broken.pop("joint_blocks.1.x_block.attn2.qkv.bias")
    broken["joint_blocks.9.x_block.attn.qkv.weight"] = torch.zeros(3)
    with pytest.raises(WeightError, match=r"missing \(1\): joint_blocks.1.x_block.attn2.qkv.bias"
                                          r"[\s\S]*unexpected \(1\): joint_blocks.9"):
        sai_to_diffusers(broken, c)


def test_size_errors():
    c, impl, _ = _pair("sd3-medium")
    x, t, y, ctx = _inputs(c, 1, 8, 8)
    with pytest.raises(ValueError, match="latent width 7 is not a multiple of the patch size 2"):
        impl(x[..., :7], t, y, ctx)
    with pytest.raises(ValueError, match="latent height 34 gives 17 patches; the position table holds 16"):
        impl(torch.zeros(1, 16, 34, 8), t, y, ctx)


def test_vae_bitwise():
    c, w = embedded.VAE, embedded.vae_weights()
    ref = own_storage(diffusers.AutoencoderKL.from_pretrained(model_dir("sd3-medium") / "vae").eval())
    g = torch.Generator().manual_seed(0)
    img, z = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1, torch.randn(2, 16, 8, 6, generator=g)
    with pinned(1):
        for attention, bitwise in (("linear", True), ("conv", False)):  # QUIRKS V1b: 1x1 convs are another kernel
            m = VAE(c, attention)
            load_strict(m, w, "vae")
            mean, std = m.encode_moments(img)
            dist = ref.encode(img).latent_dist
            dec, rdec = m.decode(z), ref.decode(z).sample
            assert torch.equal(mean, dist.mean) == bitwise and torch.equal(std, dist.std) == bitwise
            assert torch.equal(dec, rdec) == bitwise and (dec - rdec).abs().max() < 1e-4


def test_naming_table_is_the_one_source_of_names():
    """The weight rules and the layer maps come from the same rows: every mapped record module of a row with
    parameters is the module those parameters convert from/to, on both sides."""
    c = embedded.MMDIT["sd3.5-medium"]
    rows = N.mmdit_rows(c.depth, c.qk_norm, c.dual_attention_layers)
    rules = {r.sai: r for r in N.weight_rules(rows)}
    for row in rows:
        if row.record is not None and row.weights is not None:
            rule = rules[f"{row.impl}.{row.leaves[0]}"]
            assert rule.diffusers == tuple(f"{d}.{row.leaves[0]}" for d in row.diffusers.split("|"))
    assert {r.transform for r in rules.values()} == {"copy", "split3", "swap"}
    assert N.points(rows, "diffusers")["final.modulation"].transform == "swap_halves"  # derived from the swap rule
    assert N.points(rows, "sai")["block.0.x.attn.q"] == N.At("joint_blocks.0.x_block.attn.qkv", "output", "third.0")
