"""One naming table per component (MMDiT, VAE, CLIP, T5): the only place that knows both naming schemes.

Each row names a record, where each side reads it (impl, diffusers / transformers, the SD3.5 code) and, for rows
that hold parameters, the weight transform between impl's names (the SAI checkpoint keys for the MMDiT and VAE,
transformers' for CLIP and T5) and diffusers' names. The weight-conversion rules (``weight_rules``) and the
activation layer maps (``points``) are both derived from the table, so a renamed diffusers module is one edit.

Weight transforms between SAI and diffusers names:

* ``copy``  the same tensor under another name;
* ``split3`` a fused ``qkv`` weight/bias cut into to_q / to_k / to_v along dim 0 (QUIRKS M4);
* ``squeeze`` a 1x1 convolution weight (SAI VAE attention) as a Linear weight, (C, C, 1, 1) <-> (C, C);
* ``swap``  a 2-way adaLN Linear whose output halves are (shift, scale) in SAI and (scale, shift) in diffusers'
  ``AdaLayerNormContinuous`` (the last context block and the final layer, QUIRKS M2). Its activation is read with
  its halves swapped back (``swap_halves``).

What a side reads at a module: ``output``, ``output.K`` (element K of a returned tuple), ``input`` / ``input.K``
(the first / K-th positional argument: residual streams no module returns). Activation transforms bring a
reference tensor into impl's form: ``swap_halves``, ``third.K`` (part K of a fused q|k|v output), ``heads_first``
((B, L, H, E) -> (B, H, L, E)).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SIDES = ("impl", "diffusers", "sai", "comfyui")


@dataclass(frozen=True)
class At:
    """Where one side reads a record: a module, what is read there, and the transform to impl's form."""
    module: str
    reads: str = "output"
    transform: str = ""


@dataclass(frozen=True)
class Row:
    record: str | None  # None: a weights-only row
    impl: str  # impl's module (its parameters: the SAI / transformers key prefix)
    diffusers: str  # diffusers' / transformers' module(s); several joined by "|" for split3
    weights: str | None = None  # copy | split3 | squeeze | swap; None: no parameters in this row
    leaves: tuple[str, ...] = ("weight", "bias")
    reads: str = "output"  # where impl and diffusers read the record (unless the fields below say otherwise)
    diffusers_reads: str | None = None
    sai: At | None = None  # the SD3.5 code's module when it differs from impl's (same reads otherwise)
    comfyui: At | None = None  # ComfyUI's when it differs from the SD3.5 code's (its modules came from that code)

    def at(self, side: str) -> At:
        if side == "impl":
            return At(self.impl, self.reads)
        if side == "diffusers":
            return At(self.diffusers, self.diffusers_reads or self.reads, "swap_halves" if self.weights == "swap" else "")
        if side == "sai":
            return self.sai or At(self.impl, self.reads)
        if side == "comfyui":
            return self.comfyui or self.at("sai")
        raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")


@dataclass(frozen=True)
class Rule:
    """One weight-conversion rule: an SAI (impl) key and the diffusers key(s) it becomes."""
    sai: str
    diffusers: tuple[str, ...]
    transform: str


def weight_rules(rows: list[Row]) -> list[Rule]:
    def key(module: str, leaf: str) -> str:
        return f"{module}.{leaf}" if leaf else module
    return [Rule(key(r.impl, leaf), tuple(key(d, leaf) for d in r.diffusers.split("|")),
                 "copy" if r.weights == "squeeze" and leaf == "bias" else r.weights)
            for r in rows if r.weights is not None for leaf in r.leaves]


def points(rows: list[Row], side: str) -> dict[str, At]:
    """record -> where ``side`` reads it, in table order (execution order within a call)."""
    return {r.record: r.at(side) for r in rows if r.record is not None}


# ---------------------------------------------------------------------------------------------- MMDiT

def mmdit_rows(depth: int, qk_norm: bool, dual: tuple[int, ...]) -> list[Row]:
    """impl / SAI ``MMDiTX`` names <-> diffusers ``SD3Transformer2DModel``. Records are ``block.{i}.{stream}.{op}``
    with stream ``x`` (image) or ``context``. The SD3.5 code reads impl's names except at impl's capture points
    (``tokens``: joint block 0's image input; ``c``: the final layer's conditioning input; q/k/v: thirds of the
    fused ``qkv`` output; ln_q/ln_k per token, (B, L, H, E))."""
    rows = [Row("patch_embed", "x_embedder.proj", "pos_embed.proj", "copy"),
            Row(None, "pos_embed", "pos_embed.pos_embed", "copy", leaves=("",)),  # a buffer: the names themselves
            Row("tokens", "tokens", "pos_embed", sai=At("joint_blocks.0", "input.1")),
            Row(None, "t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1", "copy"),
            Row(None, "t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2", "copy"),
            Row("t_embedder", "t_embedder", "time_text_embed.timestep_embedder"),
            Row(None, "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1", "copy"),
            Row(None, "y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2", "copy"),
            Row("y_embedder", "y_embedder", "time_text_embed.text_embedder"),
            Row("c", "cond", "time_text_embed", sai=At("final_layer", "input.1")),
            Row("context_embedder", "context_embedder", "context_embedder", "copy")]
    for i in range(depth):
        s, d, last = f"joint_blocks.{i}", f"transformer_blocks.{i}", i == depth - 1
        x, cx = f"{s}.x_block", f"{s}.context_block"
        xs = [Row(f"block.{i}.x.modulation", f"{x}.adaLN_modulation.1", f"{d}.norm1.linear", "copy")]
        cs = [Row(f"block.{i}.context.modulation", f"{cx}.adaLN_modulation.1", f"{d}.norm1_context.linear",
                  "swap" if last else "copy")]
        for rows_, stream, prefix, attn, names in ((xs, "x", x, "attn", ("to_q", "to_k", "to_v")),
                                                   (cs, "context", cx, "attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            rows_.append(Row(None, f"{prefix}.{attn}.qkv", "|".join(f"{d}.attn.{n}" for n in names), "split3"))
            for k, n in enumerate("qkv"):
                rows_.append(Row(f"block.{i}.{stream}.attn.{n}", f"{prefix}.attn.{n}", f"{d}.attn.{names[k]}",
                                 sai=At(f"{prefix}.attn.qkv", "output", f"third.{k}")))
            if qk_norm:
                for n, dn in (("q", "q" if stream == "x" else "added_q"), ("k", "k" if stream == "x" else "added_k")):
                    rows_.append(Row(f"block.{i}.{stream}.attn.ln_{n}", f"{prefix}.attn.ln_{n}", f"{d}.attn.norm_{dn}",
                                     "copy", leaves=("weight",), sai=At(f"{prefix}.attn.ln_{n}", "output", "heads_first")))
        xs.append(Row(f"block.{i}.x.attn.proj", f"{x}.attn.proj", f"{d}.attn.to_out.0", "copy"))
        if i in dual:
            xs.append(Row(None, f"{x}.attn2.qkv", "|".join(f"{d}.attn2.to_{n}" for n in "qkv"), "split3"))
            for k, n in enumerate("qkv"):
                xs.append(Row(f"block.{i}.x.attn2.{n}", f"{x}.attn2.{n}", f"{d}.attn2.to_{n}",
                              sai=At(f"{x}.attn2.qkv", "output", f"third.{k}")))
            if qk_norm:
                for n in "qk":
                    xs.append(Row(f"block.{i}.x.attn2.ln_{n}", f"{x}.attn2.ln_{n}", f"{d}.attn2.norm_{n}", "copy",
                                  leaves=("weight",), sai=At(f"{x}.attn2.ln_{n}", "output", "heads_first")))
            xs.append(Row(f"block.{i}.x.attn2.proj", f"{x}.attn2.proj", f"{d}.attn2.to_out.0", "copy"))
        xs += [Row(f"block.{i}.x.mlp.fc1", f"{x}.mlp.fc1", f"{d}.ff.net.0.proj", "copy"),
               Row(f"block.{i}.x.mlp.fc2", f"{x}.mlp.fc2", f"{d}.ff.net.2", "copy")]
        if not last:  # the last context block is pre-only (QUIRKS M5)
            cs += [Row(f"block.{i}.context.attn.proj", f"{cx}.attn.proj", f"{d}.attn.to_add_out", "copy"),
                   Row(f"block.{i}.context.mlp.fc1", f"{cx}.mlp.fc1", f"{d}.ff_context.net.0.proj", "copy"),
                   Row(f"block.{i}.context.mlp.fc2", f"{cx}.mlp.fc2", f"{d}.ff_context.net.2", "copy")]
        rows += xs + cs + [Row(f"block.{i}.x", s, d, reads="output.1")]
        if not last:
            rows.append(Row(f"block.{i}.context", s, d, reads="output.0"))
    return rows + [Row("final.modulation", "final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
                   Row(None, "final_layer.linear", "proj_out", "copy"),
                   Row("final", "final_layer", "proj_out")]


_ELEMENTWISE = "elementwise (SiLU / GELU / dropout) between captured points"
# modules each side has that no record reads, each with the reason (check_coverage refuses any other)
MMDIT_SKIP = {
    "impl": {
        r"": "the whole model (its output is recorded as 'output')",
        r"joint_blocks(\.\d+(\.(x|context)_block(\.(attn2?|mlp))?)?)?": "containers, or called only through parts",
        r"joint_blocks\.\d+\.(x|context)_block\.adaLN_modulation(\.0)?": "Sequential / SiLU; the Linear is captured",
        r"final_layer\.(adaLN_modulation(\.0)?|linear)": "final_layer output and its modulation Linear are captured",
        r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.qkv": "fused projection; its thirds are captured as q, k, v",
        r"x_embedder": "container of proj", r"(t|y)_embedder\.mlp(\.\d)?": "inside the captured embedder",
    },
    "diffusers": {
        r"": "the whole model", r"transformer_blocks": "container",
        r"transformer_blocks\.\d+\.(norm1|norm1_context)(\.(norm|silu))?": "adaLN wrappers; their Linear is captured",
        r"transformer_blocks\.\d+\.(norm2|norm2_context)": "parameter-free LayerNorm inside the block",
        r"transformer_blocks\.\d+\.attn2?(\.to_out)?": "attention wrapper; its projections are captured",
        r"transformer_blocks\.\d+\.attn2?\.to_out\.1": "dropout (identity at inference)",
        r"transformer_blocks\.\d+\.(ff|ff_context)(\.net(\.0|\.1)?)?": _ELEMENTWISE,
        r"time_text_embed\.(timestep_embedder|text_embedder)\.(act_1|act|linear_1|linear_2)": "inside a captured embedder",
        r"time_text_embed\.time_proj": "parameter-free sinusoid; the embedder output is captured",
        r"norm_out(\.norm|\.silu)?": "final adaLN wrapper; norm_out.linear and proj_out are captured",
    },
    "sai": {
        r"": "the whole model", r"joint_blocks": "container",
        r"joint_blocks\.\d+": "joint block; its streams' parts and block 0's input are captured",
        r"joint_blocks\.\d+\.(x|context)_block(\.attn2?)?": "stream / attention containers; their parts are captured",
        r"joint_blocks\.\d+\.(x|context)_block\.(norm1|norm2)": "parameter-free LayerNorm inside the block",
        r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.ln_[qk]": "Identity without qk-norm (SD3-Medium)",
        r"joint_blocks\.\d+\.(x|context)_block\.adaLN_modulation(\.0)?": "Sequential / SiLU; the Linear is captured",
        r"joint_blocks\.\d+\.(x|context)_block\.mlp(\.act)?": _ELEMENTWISE,
        r"x_embedder": "container of proj", r"(t|y)_embedder\.mlp(\.\d)?": "inside the captured embedder",
        r"final_layer\.(norm_final|linear|adaLN_modulation(\.0)?)": "inside the captured final layer",
    },
}
MMDIT_SKIP["comfyui"] = {**MMDIT_SKIP["sai"],
                         r"joint_blocks\.\d+\.(x|context)_block\.(attn2?\.proj_drop|mlp\.(drop1|drop2|norm))":
                             "dropout / Identity (inference)",
                         r"x_embedder\.norm": "Identity (no patch-embedding norm in SD3)"}


# ---------------------------------------------------------------------------------------------- VAE

def _resnet(rows: list, record: str, sai: str, dif: str, shortcut: bool) -> None:
    for n in ("norm1", "conv1", "norm2", "conv2"):
        rows.append(Row(None, f"{sai}.{n}", f"{dif}.{n}", "copy"))
    if shortcut:
        rows.append(Row(None, f"{sai}.nin_shortcut", f"{dif}.conv_shortcut", "copy"))
    rows.append(Row(record, sai, dif))


def _mid(rows: list, sai: str, dif: str) -> None:
    _resnet(rows, f"{sai}.block_1", f"{sai}.block_1", f"{dif}.resnets.0", False)
    rows.append(Row(None, f"{sai}.attn_1.norm", f"{dif}.attentions.0.group_norm", "copy"))
    for s_name, d_name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rows.append(Row(None, f"{sai}.attn_1.{s_name}", f"{dif}.attentions.0.{d_name}", "squeeze"))
    rows.append(Row(f"{sai}.attn_1", f"{sai}.attn_1", f"{dif}.attentions.0"))
    _resnet(rows, f"{sai}.block_2", f"{sai}.block_2", f"{dif}.resnets.1", False)


def vae_rows(ch_mult: tuple[int, ...], num_res_blocks: int) -> list[Row]:
    """impl / SAI VAE names <-> diffusers ``AutoencoderKL`` (SAI ``up.{i}`` is diffusers ``up_blocks.{n-1-i}``);
    records are the SAI module names, encoder then decoder, each in execution order. The SD3.5 code reads impl's
    names."""
    rows: list[Row] = []
    n, chans = len(ch_mult), list(ch_mult)
    rows.append(Row("encoder.conv_in", "encoder.conv_in", "encoder.conv_in", "copy"))
    cin = 1
    for i, cout in enumerate(chans):
        for j in range(num_res_blocks):
            _resnet(rows, f"encoder.down.{i}.block.{j}", f"encoder.down.{i}.block.{j}",
                    f"encoder.down_blocks.{i}.resnets.{j}", j == 0 and cin != cout)
        if i != n - 1:
            rows.append(Row(None, f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                            "copy"))
            rows.append(Row(f"encoder.down.{i}.downsample", f"encoder.down.{i}.downsample",
                            f"encoder.down_blocks.{i}.downsamplers.0"))
        cin = cout
    _mid(rows, "encoder.mid", "encoder.mid_block")
    rows.append(Row("encoder.norm_out", "encoder.norm_out", "encoder.conv_norm_out", "copy"))
    rows.append(Row("encoder.conv_out", "encoder.conv_out", "encoder.conv_out", "copy"))
    rows.append(Row("decoder.conv_in", "decoder.conv_in", "decoder.conv_in", "copy"))
    _mid(rows, "decoder.mid", "decoder.mid_block")
    cin = chans[-1]
    for i in reversed(range(n)):
        for j in range(num_res_blocks + 1):
            _resnet(rows, f"decoder.up.{i}.block.{j}", f"decoder.up.{i}.block.{j}",
                    f"decoder.up_blocks.{n - 1 - i}.resnets.{j}", j == 0 and cin != chans[i])
        cin = chans[i]
        if i != 0:
            rows.append(Row(None, f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv",
                            "copy"))
            rows.append(Row(f"decoder.up.{i}.upsample", f"decoder.up.{i}.upsample",
                            f"decoder.up_blocks.{n - 1 - i}.upsamplers.0"))
    rows.append(Row("decoder.norm_out", "decoder.norm_out", "decoder.conv_norm_out", "copy"))
    rows.append(Row("decoder.conv_out", "decoder.conv_out", "decoder.conv_out", "copy"))
    return rows


def vae_points(rows: list[Row], side: str, part: str) -> dict[str, At]:
    """The records of ``part`` (``encoder`` or ``decoder``) of the VAE table."""
    return {k: v for k, v in points(rows, side).items() if k.startswith(part + ".")}


# ---------------------------------------------------------------------------------------------- CLIP and T5
# impl took transformers' module names, and the SD3.5 code (other_impls) uses them too: weights load by identity.
# The tables map records; what differs is listed per side.

def clip_rows(n_layers: int) -> list[Row]:
    L = "text_model.encoder.layers.{i}"
    per_layer = [Row(f"layers.{{i}}.{sub}", f"{L}.{sub}", f"{L}.{sub}") for sub in
                 ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "self_attn")]
    per_layer.append(Row("layers.{i}.resid_attn", f"{L}.resid_attn", f"{L}.layer_norm2", diffusers_reads="input",
                         sai=At(f"{L}.layer_norm2", "input")))
    per_layer += [Row(f"layers.{{i}}.{sub}", f"{L}.{sub}", f"{L}.{sub}") for sub in
                  ("layer_norm2", "mlp.fc1", "mlp.fc2", "mlp")]
    per_layer.append(Row("layers.{i}", L, L))
    return ([Row("token_embedding", "text_model.embeddings.token_embedding", "text_model.embeddings.token_embedding"),
             Row("embeddings", "text_model.embeddings", "text_model.embeddings",
                 comfyui=At("text_model.encoder.layers.0", "input"))]  # ComfyUI adds the positions inline
            + _per_layer(per_layer, n_layers)
            + [Row("final_layer_norm", "text_model.final_layer_norm", "text_model.final_layer_norm"),
               Row("text_projection", "text_projection", "text_projection")])


def t5_rows(n_layers: int, ref_embed: str = "encoder.embed_tokens") -> list[Row]:
    """``ref_embed``: the name the tied input embedding has among transformers' modules (5.x lists
    ``encoder.embed_tokens``, 4.x only ``shared``, the same module object)."""
    B = "encoder.block.{i}"
    per_layer = [Row(f"block.{{i}}.{sub}", f"{B}.{sub}", f"{B}.{sub}") for sub in
                 ("layer.0.layer_norm", "layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                  "layer.0.SelfAttention.o", "layer.0.SelfAttention", "layer.0", "layer.1.layer_norm",
                  "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo",
                  "layer.1.DenseReluDense", "layer.1")]
    per_layer.append(Row("block.{i}", B, B))
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    return ([Row("embed", "shared", ref_embed, sai=At("encoder.embed_tokens"), comfyui=At("shared")),
             Row("relative_attention_bias", bias, bias)]
            + _per_layer(per_layer, n_layers)
            + [Row("final_layer_norm", "encoder.final_layer_norm", "encoder.final_layer_norm")])


def _per_layer(rows: list[Row], n: int) -> list[Row]:
    def fmt(r: Row, i: int) -> Row:
        f = lambda t: t.format(i=i)  # noqa: E731
        sai = None if r.sai is None else At(f(r.sai.module), r.sai.reads, r.sai.transform)
        comfyui = None if r.comfyui is None else At(f(r.comfyui.module), r.comfyui.reads, r.comfyui.transform)
        return Row(f(r.record), f(r.impl), f(r.diffusers), r.weights, r.leaves, r.reads, r.diffusers_reads, sai,
                   comfyui)
    return [fmt(r, i) for i in range(n) for r in rows]


_POS = r"text_model\.embeddings\.position_embedding"
CLIP_SKIP = {
    "impl": {r"": "the whole model (outputs compared separately)",
             r"text_model(\.encoder(\.layers)?)?": "containers, never called as modules",
             _POS: "impl reads the weight rows directly; token_embedding and embeddings bracket it"},
    "diffusers": {r"": "the whole model", r"text_model": "its outputs are compared as final_layer_norm/pooled",
                  r"text_model\.encoder(\.layers)?": "containers (encoder output = last layer output)",
                  r"text_model\.encoder\.layers\.\d+\.mlp\.activation_fn": "elementwise; fc1 and fc2 bracket it",
                  _POS: "token_embedding and embeddings bracket it"},
    "sai": {r"": "the whole model", r"text_model": "its outputs are compared as final_layer_norm/pooled",
            r"text_model\.encoder(\.layers)?": "containers (encoder output = last layer output)",
            _POS: "the weight is read directly; token_embedding and embeddings bracket it"},
    "comfyui": {r"": "the whole model", r"text_model": "its outputs are compared as final_layer_norm/pooled",
                r"text_model\.encoder(\.layers)?": "containers (encoder output = last layer output)",
                r"text_model\.embeddings": "never called: the positions are added inline (read at layer 0's input)",
                _POS: "the weight is read directly"},
}
T5_SKIP = {
    "impl": {r"": "the whole model", r"encoder(\.block(\.\d+\.layer)?)?": "containers, never called as modules"},
    "diffusers": {r"": "the whole model", r"encoder": "its output = final_layer_norm output",
                  r"shared": "the tied input embedding; the encoder calls encoder.embed_tokens",
                  r"encoder\.block(\.\d+\.layer)?": "container",
                  r"(encoder\.)?dropout|encoder\.block\.\d+\.layer\.\d+\.(dropout|DenseReluDense\.(dropout|act))":
                      "identity at inference (dropout) or elementwise (act) between captured points"},
    "sai": {r"": "the whole model", r"encoder": "its output = final_layer_norm output",
            r"encoder\.block(\.\d+\.layer)?": "container"},
    "comfyui": {r"": "the whole model", r"encoder": "its output = final_layer_norm output",
                r"encoder\.block(\.\d+\.layer)?": "container"},
}


# ---------------------------------------------------------------------------------------------- transforms

def apply_transform(name: str, t):
    """A reference tensor in impl's form (see the module docstring)."""
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


def check_coverage(where: dict[str, At], model: torch.nn.Module, skip: dict[str, str], what: str) -> None:
    """Every module the map names exists, and every module of ``model`` is either mapped or skipped with a
    reason: a renamed or new module is an error, never a silent gap."""
    present = dict(model.named_modules())
    names = {a.module for a in where.values()}
    absent = sorted(names - set(present))
    unmatched = sorted(n for n in present if n not in names and not any(re.fullmatch(p, n) for p in skip))
    if absent or unmatched:
        raise CoverageError(f"{what}: layer map vs modules: mapped but absent {absent[:10]}, "
                            f"present but neither mapped nor skipped {unmatched[:10]}")
