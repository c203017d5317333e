"""Declared layer maps impl <-> transformers, and hook-based capture of the mapped points.

Each entry names a record (``layers.{i}.self_attn``), the impl module, the reference module and what to read there:
its output, or its first input (for residual streams that no reference module returns). No name heuristics: maps are
expanded over the layer count and checked for coverage; a module on either side that is neither mapped nor listed
as deliberately skipped (with the reason) is an error.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Point:
    layer: str
    impl: str
    ref: str
    ref_reads: str = "output"  # "input" (first argument), "input.K" (argument K), "output.K" (element K of a tuple)
    transform: str = ""  # applied to the reference tensor before comparing (``apply_transform``)
    impl_reads: str = "output"


def _expand(rows, n: int) -> list[Point]:
    """Rows with ``{i}`` are repeated per layer, layer by layer, so the list is in execution order."""
    def point(row, i=None):
        layer, impl, ref, *reads = row
        f = (lambda t: t.format(i=i)) if i is not None else (lambda t: t)
        return Point(f(layer), f(impl), f(ref), *reads)

    per_layer = [r for r in rows if "{i}" in r[0]]
    first = next(k for k, r in enumerate(rows) if "{i}" in r[0])
    last = max(k for k, r in enumerate(rows) if "{i}" in r[0])
    return ([point(r) for r in rows[:first]] + [point(r, i) for i in range(n) for r in per_layer]
            + [point(r) for r in rows[last + 1 :]])


def clip_map(n_layers: int) -> list[Point]:
    L, R = "text_model.encoder.layers.{i}", "text_model.encoder.layers.{i}"
    rows = [("token_embedding", "text_model.embeddings.token_embedding", "text_model.embeddings.token_embedding"),
            ("embeddings", "text_model.embeddings", "text_model.embeddings")]
    for sub in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "self_attn"):
        rows.append((f"layers.{{i}}.{sub}", f"{L}.{sub}", f"{R}.{sub}"))
    rows.append(("layers.{i}.resid_attn", f"{L}.resid_attn", f"{R}.layer_norm2", "input"))
    for sub in ("layer_norm2", "mlp.fc1", "mlp.fc2", "mlp"):
        rows.append((f"layers.{{i}}.{sub}", f"{L}.{sub}", f"{R}.{sub}"))
    rows += [("layers.{i}", L, R), ("final_layer_norm", "text_model.final_layer_norm", "text_model.final_layer_norm"),
             ("text_projection", "text_projection", "text_projection")]
    return _expand(rows, n_layers)


_POS = r"text_model\.embeddings\.position_embedding"
CLIP_SKIP_IMPL = {r"": "the whole model (outputs compared separately)", r"text_model(\.encoder(\.layers)?)?":
                  "containers, never called as modules", _POS: "impl reads the weight rows directly; "
                  "token_embedding and embeddings bracket it"}
CLIP_SKIP_REF = {r"": "the whole model", r"text_model": "its outputs are compared as final_layer_norm/pooled",
                 r"text_model\.encoder(\.layers)?": "containers (encoder output = last layer output)",
                 r"text_model\.encoder\.layers\.\d+\.mlp\.activation_fn": "elementwise; fc1 and fc2 bracket it",
                 _POS: "token_embedding and embeddings bracket it"}


def t5_map(n_layers: int, ref_embed: str = "encoder.embed_tokens") -> list[Point]:
    """``ref_embed``: the name the tied input embedding has among the reference's modules: transformers 5 lists
    ``encoder.embed_tokens``, 4.x only ``shared`` (the same module object, de-duplicated by ``named_modules``)."""
    B = "encoder.block.{i}"
    rows = [("embed", "shared", ref_embed),
            ("relative_attention_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias")]
    for sub in ("layer.0.layer_norm", "layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                "layer.0.SelfAttention.o", "layer.0.SelfAttention", "layer.0", "layer.1.layer_norm",
                "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo",
                "layer.1.DenseReluDense", "layer.1"):
        rows.append((f"block.{{i}}.{sub}", f"{B}.{sub}", f"{B}.{sub}"))
    rows += [("block.{i}", B, B), ("final_layer_norm", "encoder.final_layer_norm", "encoder.final_layer_norm")]
    return _expand(rows, n_layers)


T5_SKIP_IMPL = {r"": "the whole model", r"encoder(\.block(\.\d+\.layer)?)?": "containers, never called as modules"}
T5_SKIP_REF = {r"": "the whole model", r"encoder": "its output = final_layer_norm output",
               r"shared": "the tied input embedding; the encoder calls encoder.embed_tokens",
               r"encoder\.block(\.\d+\.layer)?": "container",
               r"(encoder\.)?dropout|encoder\.block\.\d+\.layer\.\d+\.(dropout|DenseReluDense\.(dropout|act))":
                   "identity at inference (dropout) or elementwise (act) between captured points"}


def mmdit_map(depth: int, qk_norm: bool, dual: tuple[int, ...]) -> list[Point]:
    """impl (SAI names) <-> diffusers ``SD3Transformer2DModel``, in execution order. Layers are named
    ``block.{i}.{stream}.{sub-op}`` with stream ``x`` (image) or ``context``."""
    pts = [Point("patch_embed", "x_embedder.proj", "pos_embed.proj"),
           Point("tokens", "tokens", "pos_embed"),
           Point("t_embedder", "t_embedder", "time_text_embed.timestep_embedder"),
           Point("y_embedder", "y_embedder", "time_text_embed.text_embedder"),
           Point("c", "cond", "time_text_embed"),
           Point("context_embedder", "context_embedder", "context_embedder")]
    for i in range(depth):
        s, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == depth - 1
        xs, cs = [], []
        xs.append(Point(f"block.{i}.x.modulation", f"{s}.x_block.adaLN_modulation.1", f"{d}.norm1.linear"))
        cs.append(Point(f"block.{i}.context.modulation", f"{s}.context_block.adaLN_modulation.1",
                        f"{d}.norm1_context.linear", transform="swap_halves" if last else ""))
        for n in "qkv":
            xs.append(Point(f"block.{i}.x.attn.{n}", f"{s}.x_block.attn.{n}", f"{d}.attn.to_{n}"))
            cs.append(Point(f"block.{i}.context.attn.{n}", f"{s}.context_block.attn.{n}", f"{d}.attn.add_{n}_proj"))
        if qk_norm:
            for n in "qk":
                xs.append(Point(f"block.{i}.x.attn.ln_{n}", f"{s}.x_block.attn.ln_{n}", f"{d}.attn.norm_{n}"))
                cs.append(Point(f"block.{i}.context.attn.ln_{n}", f"{s}.context_block.attn.ln_{n}",
                                f"{d}.attn.norm_added_{n}"))
        xs.append(Point(f"block.{i}.x.attn.proj", f"{s}.x_block.attn.proj", f"{d}.attn.to_out.0"))
        if i in dual:
            for n in "qkv":
                xs.append(Point(f"block.{i}.x.attn2.{n}", f"{s}.x_block.attn2.{n}", f"{d}.attn2.to_{n}"))
            if qk_norm:
                for n in "qk":
                    xs.append(Point(f"block.{i}.x.attn2.ln_{n}", f"{s}.x_block.attn2.ln_{n}", f"{d}.attn2.norm_{n}"))
            xs.append(Point(f"block.{i}.x.attn2.proj", f"{s}.x_block.attn2.proj", f"{d}.attn2.to_out.0"))
        xs += [Point(f"block.{i}.x.mlp.fc1", f"{s}.x_block.mlp.fc1", f"{d}.ff.net.0.proj"),
               Point(f"block.{i}.x.mlp.fc2", f"{s}.x_block.mlp.fc2", f"{d}.ff.net.2")]
        if not last:
            cs += [Point(f"block.{i}.context.attn.proj", f"{s}.context_block.attn.proj", f"{d}.attn.to_add_out"),
                   Point(f"block.{i}.context.mlp.fc1", f"{s}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj"),
                   Point(f"block.{i}.context.mlp.fc2", f"{s}.context_block.mlp.fc2", f"{d}.ff_context.net.2")]
        pts += xs + cs + [Point(f"block.{i}.x", s, d, "output.1", impl_reads="output.1")]
        if not last:
            pts.append(Point(f"block.{i}.context", s, d, "output.0", impl_reads="output.0"))
    pts += [Point("final.modulation", "final_layer.adaLN_modulation.1", "norm_out.linear", transform="swap_halves"),
            Point("final", "final_layer", "proj_out")]
    return pts


_ELEMENTWISE = "elementwise (SiLU / GELU / dropout) between captured points"
MMDIT_SKIP_IMPL = {
    r"": "the whole model (its output is compared as 'output')",
    r"joint_blocks(\.\d+(\.(x|context)_block(\.(attn2?|mlp))?)?)?": "containers, or called only through parts",
    r"joint_blocks\.\d+\.(x|context)_block\.adaLN_modulation(\.0)?": "Sequential / SiLU; the Linear is captured",
    r"final_layer\.(adaLN_modulation(\.0)?|linear)": "final_layer output and its modulation Linear are captured",
    r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.qkv": "fused projection; its thirds are captured as q, k, v",
    r"x_embedder": "container of proj", r"(t|y)_embedder\.mlp(\.\d)?": "inside the captured embedder",
}
MMDIT_SKIP_REF = {
    r"": "the whole model", r"transformer_blocks": "container",
    r"transformer_blocks\.\d+\.(norm1|norm1_context)(\.(norm|silu))?": "adaLN wrappers; their Linear is captured",
    r"transformer_blocks\.\d+\.(norm2|norm2_context)": "parameter-free LayerNorm inside the block",
    r"transformer_blocks\.\d+\.attn2?(\.to_out)?": "attention wrapper; its projections are captured",
    r"transformer_blocks\.\d+\.attn2?\.to_out\.1": "dropout (identity at inference)",
    r"transformer_blocks\.\d+\.(ff|ff_context)(\.net(\.0|\.1)?)?": _ELEMENTWISE,
    r"time_text_embed\.(timestep_embedder|text_embedder)\.(act_1|act|linear_1|linear_2)": "inside a captured embedder",
    r"time_text_embed\.time_proj": "parameter-free sinusoid; the embedder output is captured",
    r"norm_out(\.norm|\.silu)?": "final adaLN wrapper; norm_out.linear and proj_out are captured",
}


def sai_mmdit_map(depth: int, qk_norm: bool, dual: tuple[int, ...]) -> list[Point]:
    """impl <-> the SD3.5 reference's ``MMDiTX``: the same module names (impl took SAI's), except impl's capture
    points that no reference module returns: ``tokens`` is joint block 0's image input, ``c`` the final layer's
    conditioning input, q/k/v the thirds of the fused ``qkv`` output, and ln_q/ln_k are read per token
    (B, L, H, E) where impl has them per head (B, H, L, E). No swapped halves: both split (shift, scale)."""
    pts = []
    for p in mmdit_map(depth, qk_norm, dual):
        ref, reads, transform = p.impl, p.impl_reads, ""
        if p.layer == "tokens":
            ref, reads = "joint_blocks.0", "input.1"
        elif p.layer == "c":
            ref, reads = "final_layer", "input.1"
        elif re.search(r"\.attn2?\.[qkv]$", p.impl):
            ref, transform = p.impl[:-1] + "qkv", f"third.{'qkv'.index(p.impl[-1])}"
        elif re.search(r"\.attn2?\.ln_[qk]$", p.impl):
            transform = "heads_first"
        pts.append(Point(p.layer, p.impl, ref, reads, transform, p.impl_reads))
    return pts


SAI_MMDIT_SKIP = {
    r"": "the whole model", r"joint_blocks": "container",
    r"joint_blocks\.\d+\.(x|context)_block(\.attn2?)?": "stream / attention containers; their parts are captured",
    r"joint_blocks\.\d+\.(x|context)_block\.(norm1|norm2)": "parameter-free LayerNorm inside the block",
    r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.ln_[qk]": "Identity without qk-norm (SD3-Medium)",
    r"joint_blocks\.\d+\.(x|context)_block\.adaLN_modulation(\.0)?": "Sequential / SiLU; the Linear is captured",
    r"joint_blocks\.\d+\.(x|context)_block\.mlp(\.act)?": _ELEMENTWISE,
    r"x_embedder": "container of proj", r"(t|y)_embedder\.mlp(\.\d)?": "inside the captured embedder",
    r"final_layer\.(norm_final|linear|adaLN_modulation(\.0)?)": "inside the captured final layer",
}


def apply_transform(name: str, t):
    """A reference tensor in impl's form: ``swap_halves`` (diffusers' (scale, shift), M2), ``third.K`` (part K of
    a fused q|k|v projection), ``heads_first`` ((B, L, H, E) -> (B, H, L, E))."""
    if not name:
        return t
    if name == "swap_halves":
        return torch.cat(t.chunk(2, dim=-1)[::-1], dim=-1)
    if name.startswith("third."):
        return t.chunk(3, dim=-1)[int(name.split(".")[1])]
    if name == "heads_first":
        return t.transpose(1, 2)
    raise ValueError(f"unknown layer-map transform {name!r}")


class CoverageError(ValueError):
    pass


def check_coverage(points: list[Point], impl_model: nn.Module, ref_model: nn.Module, skip_impl: dict, skip_ref: dict,
                   what: str) -> None:
    for side, model, names, skip in (("impl", impl_model, {p.impl for p in points}, skip_impl),
                                     ("reference", ref_model, {p.ref for p in points}, skip_ref)):
        present = dict(model.named_modules())
        absent = sorted(names - set(present))
        unmatched = sorted(n for n in present if n not in names and not any(re.fullmatch(p, n) for p in skip))
        if absent or unmatched:
            raise CoverageError(f"{what} layer map vs {side} modules: mapped but absent {absent[:10]}, "
                                f"present but neither mapped nor skipped {unmatched[:10]}")


def _first_tensor(x):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    raise TypeError(f"capture point returned {type(x).__name__}, not a tensor")


@contextlib.contextmanager
def capture(model: nn.Module, where: dict[str, tuple[str, str]], store: dict[str, list[Tensor]]):
    """Hook ``model``: for each record ``name -> (module name, 'output'|'input')`` append the tensor to store[name]
    at every call (a module called twice, e.g. for two prompts, gives two entries)."""
    modules = dict(model.named_modules())
    handles = []
    for name, (mod, reads) in where.items():
        def hook(_m, args, out, name=name, reads=reads):
            if reads.startswith(("output.", "input.")):
                t = (out if reads.startswith("output.") else args)[int(reads.split(".")[1])]
            else:
                t = _first_tensor(args if reads == "input" else out)
            store.setdefault(name, []).append(t.detach().clone())
        handles.append(modules[mod].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
