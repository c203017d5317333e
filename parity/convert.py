"""Declared key maps between the SAI single-file layout (impl's names) and diffusers, with their transforms.

Every rule names one SAI key and the diffusers key(s) it becomes:

* ``copy``  the same tensor under another name;
* ``split3`` a fused ``qkv`` weight/bias cut into to_q / to_k / to_v along dim 0 (QUIRKS M4);
* ``squeeze`` a 1x1 convolution weight (SAI VAE attention) as a Linear weight (diffusers), (C, C, 1, 1) <-> (C, C);
* ``swap``  a 2-way adaLN Linear whose output halves are (shift, scale) in SAI and (scale, shift) in diffusers'
  ``AdaLayerNormContinuous`` (the last context block and the final layer, QUIRKS M2): rows swapped.

Conversions are strict: every source key is consumed by a rule, every rule finds its keys with the shapes the
config implies, and errors list the missing, unexpected and mis-shaped keys by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from impl.mmdit import MMDiTConfig
from impl.vae import VAEConfig
from impl.weights import WeightError


@dataclass(frozen=True)
class Rule:
    sai: str
    diffusers: tuple[str, ...]
    transform: str  # "copy" | "split3" | "swap" | "squeeze"


def _linear(rules: list, sai: str, dif: str, transform: str = "copy", bias: bool = True) -> None:
    for leaf in ("weight", "bias") if bias else ("weight",):
        names = tuple(f"{d}.{leaf}" for d in dif.split("|"))
        rules.append(Rule(f"{sai}.{leaf}", names, transform))


def mmdit_rules(c: MMDiTConfig) -> list[Rule]:
    r: list[Rule] = []
    _linear(r, "x_embedder.proj", "pos_embed.proj")
    r.append(Rule("pos_embed", ("pos_embed.pos_embed",), "copy"))
    _linear(r, "t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    _linear(r, "t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    _linear(r, "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    _linear(r, "y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    _linear(r, "context_embedder", "context_embedder")
    for i in range(c.depth):
        s, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == c.depth - 1
        _linear(r, f"{s}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")
        _linear(r, f"{s}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear", "swap" if last else "copy")
        _linear(r, f"{s}.x_block.attn.qkv", f"{d}.attn.to_q|{d}.attn.to_k|{d}.attn.to_v", "split3")
        _linear(r, f"{s}.context_block.attn.qkv", f"{d}.attn.add_q_proj|{d}.attn.add_k_proj|{d}.attn.add_v_proj",
                "split3")
        _linear(r, f"{s}.x_block.attn.proj", f"{d}.attn.to_out.0")
        _linear(r, f"{s}.x_block.mlp.fc1", f"{d}.ff.net.0.proj")
        _linear(r, f"{s}.x_block.mlp.fc2", f"{d}.ff.net.2")
        if not last:
            _linear(r, f"{s}.context_block.attn.proj", f"{d}.attn.to_add_out")
            _linear(r, f"{s}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj")
            _linear(r, f"{s}.context_block.mlp.fc2", f"{d}.ff_context.net.2")
        if c.qk_norm:
            for sai, dif in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                             ("context_block.attn.ln_q", "attn.norm_added_q"),
                             ("context_block.attn.ln_k", "attn.norm_added_k")):
                _linear(r, f"{s}.{sai}", f"{d}.{dif}", bias=False)
        if i in c.dual_attention_layers:
            _linear(r, f"{s}.x_block.attn2.qkv", f"{d}.attn2.to_q|{d}.attn2.to_k|{d}.attn2.to_v", "split3")
            _linear(r, f"{s}.x_block.attn2.proj", f"{d}.attn2.to_out.0")
            if c.qk_norm:
                _linear(r, f"{s}.x_block.attn2.ln_q", f"{d}.attn2.norm_q", bias=False)
                _linear(r, f"{s}.x_block.attn2.ln_k", f"{d}.attn2.norm_k", bias=False)
    _linear(r, "final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    _linear(r, "final_layer.linear", "proj_out")
    return r


def _vae_resnet(r: list, sai: str, dif: str, shortcut: bool) -> None:
    for n in ("norm1", "conv1", "norm2", "conv2"):
        _linear(r, f"{sai}.{n}", f"{dif}.{n}")
    if shortcut:
        _linear(r, f"{sai}.nin_shortcut", f"{dif}.conv_shortcut")


def _vae_mid(r: list, sai: str, dif: str) -> None:
    _vae_resnet(r, f"{sai}.block_1", f"{dif}.resnets.0", False)
    _linear(r, f"{sai}.attn_1.norm", f"{dif}.attentions.0.group_norm")
    for s_name, d_name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        r.append(Rule(f"{sai}.attn_1.{s_name}.weight", (f"{dif}.attentions.0.{d_name}.weight",), "squeeze"))
        r.append(Rule(f"{sai}.attn_1.{s_name}.bias", (f"{dif}.attentions.0.{d_name}.bias",), "copy"))
    _vae_resnet(r, f"{sai}.block_2", f"{dif}.resnets.1", False)


def vae_rules(c: VAEConfig) -> list[Rule]:
    r: list[Rule] = []
    chans = [c.ch * m for m in c.ch_mult]
    n = len(chans)
    _linear(r, "encoder.conv_in", "encoder.conv_in")
    cin = c.ch
    for i, cout in enumerate(chans):
        for j in range(c.num_res_blocks):
            _vae_resnet(r, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", j == 0 and cin != cout)
        if i != n - 1:
            _linear(r, f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        cin = cout
    _vae_mid(r, "encoder.mid", "encoder.mid_block")
    _linear(r, "encoder.norm_out", "encoder.conv_norm_out")
    _linear(r, "encoder.conv_out", "encoder.conv_out")
    _linear(r, "decoder.conv_in", "decoder.conv_in")
    _vae_mid(r, "decoder.mid", "decoder.mid_block")
    cin = chans[-1]
    for i in reversed(range(n)):  # SAI up.{i} is diffusers up_blocks.{n-1-i}
        for j in range(c.num_res_blocks + 1):
            _vae_resnet(r, f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{n - 1 - i}.resnets.{j}",
                        j == 0 and cin != chans[i])
        cin = chans[i]
        if i != 0:
            _linear(r, f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv")
    _linear(r, "decoder.norm_out", "decoder.conv_norm_out")
    _linear(r, "decoder.conv_out", "decoder.conv_out")
    return r


def diffusers_vae_config(c: VAEConfig) -> dict:
    """``vae/config.json`` of diffusers' ``AutoencoderKL`` as SD3 uses it (no quant convs)."""
    n = len(c.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [c.ch * m for m in c.ch_mult], "layers_per_block": c.num_res_blocks,
            "act_fn": "silu", "latent_channels": c.z_channels, "norm_num_groups": c.groups, "sample_size": 64,
            "scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor, "use_quant_conv": False,
            "use_post_quant_conv": False, "mid_block_add_attention": True, "force_upcast": True}


def vae_config_from_diffusers(cfg: dict, source: str) -> VAEConfig:
    from impl.weights import config_value as v

    chans = v(cfg, source, "block_out_channels", list)
    if not chans or any(not isinstance(c, int) or c % chans[0] for c in chans):
        raise ValueError(f"{source}: block_out_channels {chans!r} must be multiples of the first entry")
    if cfg.get("use_quant_conv") or cfg.get("use_post_quant_conv"):
        raise ValueError(f"{source}: quant convs are not part of the SD3 VAE")
    return VAEConfig(ch=chans[0], ch_mult=tuple(c // chans[0] for c in chans),
                     num_res_blocks=v(cfg, source, "layers_per_block", int, 2),
                     z_channels=v(cfg, source, "latent_channels", int, 16),
                     in_channels=v(cfg, source, "in_channels", int, 3),
                     groups=v(cfg, source, "norm_num_groups", int, 32),
                     scaling_factor=v(cfg, source, "scaling_factor", float, 1.5305),
                     shift_factor=v(cfg, source, "shift_factor", float, 0.0609))


def _swap(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _check_keys(state: dict, wanted: set, source: str) -> None:
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        parts = [f"{source}: keys do not match the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise WeightError("\n".join(parts))


def _check_shapes(sai_state: dict[str, Tensor], c, source: str) -> None:
    """Every SAI-side tensor has the shape the config implies (built on the meta device: no memory)."""
    from impl.mmdit import MMDiT
    from impl.vae import VAE

    with torch.device("meta"):
        own = (VAE(c) if isinstance(c, VAEConfig) else MMDiT(c)).state_dict()
    bad = sorted(f"{k}: {tuple(sai_state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in sai_state and sai_state[k].shape != v.shape)
    if bad:
        raise WeightError(f"{source}: mis-shaped ({len(bad)}): " + ", ".join(bad[:20]))


def _rules(c) -> list[Rule]:
    return vae_rules(c) if isinstance(c, VAEConfig) else mmdit_rules(c)


def sai_to_diffusers(state: dict[str, Tensor], c, source: str = "SAI state") -> dict[str, Tensor]:
    """Convert one model's state dict (MMDiT or VAE, chosen by the config type), SAI names -> diffusers names."""
    rules = _rules(c)
    _check_keys(state, {r.sai for r in rules}, source)
    _check_shapes(state, c, source)
    out: dict[str, Tensor] = {}
    for r in rules:
        t = state[r.sai]
        if r.transform == "split3":
            out.update(zip(r.diffusers, (p.clone() for p in t.chunk(3, dim=0))))
        elif r.transform == "squeeze":
            out[r.diffusers[0]] = t[:, :, 0, 0]
        else:
            out[r.diffusers[0]] = _swap(t) if r.transform == "swap" else t
    return out


def diffusers_to_sai(state: dict[str, Tensor], c, source: str = "diffusers state") -> dict[str, Tensor]:
    rules = _rules(c)
    _check_keys(state, {k for r in rules for k in r.diffusers}, source)
    out: dict[str, Tensor] = {}
    for r in rules:
        parts = [state[k] for k in r.diffusers]
        if r.transform == "split3":
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1:
                raise WeightError(f"{source}: {', '.join(r.diffusers)} differ in shape ({sorted(shapes)})")
            out[r.sai] = torch.cat(parts, dim=0)
        elif r.transform == "squeeze":
            out[r.sai] = parts[0][:, :, None, None]
        else:
            out[r.sai] = _swap(parts[0]) if r.transform == "swap" else parts[0]
    _check_shapes(out, c, source)
    return out


def diffusers_config(c: MMDiTConfig) -> dict:
    """``transformer/config.json`` of ``SD3Transformer2DModel`` for this config."""
    return {"_class_name": "SD3Transformer2DModel", "sample_size": c.pos_embed_max_size * c.patch // 2,
            "patch_size": c.patch, "in_channels": c.in_channels, "out_channels": c.out_channels,
            "num_layers": c.depth, "attention_head_dim": c.head_dim, "num_attention_heads": c.heads,
            "joint_attention_dim": c.context_dim, "caption_projection_dim": c.hidden,
            "pooled_projection_dim": c.pooled_dim, "pos_embed_max_size": c.pos_embed_max_size,
            "dual_attention_layers": list(c.dual_attention_layers), "qk_norm": "rms_norm" if c.qk_norm else None}


def config_from_diffusers(cfg: dict, source: str) -> MMDiTConfig:
    from impl.weights import config_value as v

    heads, head_dim = v(cfg, source, "num_attention_heads"), v(cfg, source, "attention_head_dim")
    qk = cfg.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ValueError(f"{source}: qk_norm {qk!r} is not supported (expected null or 'rms_norm')")
    if v(cfg, source, "caption_projection_dim", int, heads * head_dim) != heads * head_dim:
        raise ValueError(f"{source}: caption_projection_dim must equal num_attention_heads * attention_head_dim")
    return MMDiTConfig(depth=v(cfg, source, "num_layers"), hidden=heads * head_dim, heads=heads,
                       pos_embed_max_size=v(cfg, source, "pos_embed_max_size"),
                       context_dim=v(cfg, source, "joint_attention_dim"),
                       pooled_dim=v(cfg, source, "pooled_projection_dim"), qk_norm=qk == "rms_norm",
                       dual_attention_layers=tuple(v(cfg, source, "dual_attention_layers", list, [])) or (),
                       patch=v(cfg, source, "patch_size", int, 2), in_channels=v(cfg, source, "in_channels", int, 16),
                       out_channels=v(cfg, source, "out_channels", int, 16))


# ---------------------------------------------------------------------------------------------- whole files

def _atomic_dir(dst: Path, fill) -> None:
    """Build ``dst`` in a sibling temporary directory and rename it into place; nothing is left on failure."""
    import shutil
    import tempfile

    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; refusing to overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)  # mkdtemp creates 0700
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _diffusers_parts(src: Path) -> tuple[list, list[str], dict]:
    """Read an SAI single file and convert its MMDiT (and VAE) to diffusers state dicts with configs."""
    from impl.checkpoint import infer_mmdit_config, infer_vae_config, match_presets, read_sai_checkpoint

    parts = read_sai_checkpoint(src)
    mc = infer_mmdit_config(parts["mmdit"], f"{src} (model.diffusion_model.*)")
    outputs = [("transformer", diffusers_config(mc), sai_to_diffusers(parts["mmdit"], mc, f"{src} (MMDiT)"))]
    lines = [f"transformer: {mc.depth} blocks, hidden {mc.hidden}, qk_norm {mc.qk_norm}, dual layers "
             f"{list(mc.dual_attention_layers)}; preset: {', '.join(match_presets(mc)) or 'none (not a released size)'}"]
    if parts["vae"]:
        vc = infer_vae_config(parts["vae"], f"{src} (first_stage_model.*)")
        outputs.append(("vae", diffusers_vae_config(vc), sai_to_diffusers(parts["vae"], vc, f"{src} (VAE)")))
        lines.append(f"vae: ch {vc.ch}, mult {list(vc.ch_mult)}, {vc.num_res_blocks} res blocks, {vc.z_channels} channels")
    if parts["text_encoders"]:
        from impl.checkpoint import load_text_encoders
        from parity.embedded import clip_config_json, t5_config_json

        models, states, notes = load_text_encoders(parts["text_encoders"], str(src))
        for name, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
            if name in models:
                c = models[name].config
                cfg = t5_config_json(c) if name == "t5" else clip_config_json(c, "CLIPTextModelWithProjection")
                outputs.append((sub, cfg, states[name]))
                lines.append(f"{sub}: {name}, " + (f"{c.layers} layers, d_model {c.d_model}" if name == "t5" else
                                                   f"{c.layers} layers, width {c.width}, {c.heads} heads"))
        lines += notes
        lines.append("tokenizer folders are not part of a single file: take them from the model's repository")
    return outputs, lines, parts


def _write_parts(outputs: list, target: Path) -> None:
    import json

    from safetensors.torch import save_file

    for sub, cfg, state in outputs:
        (target / sub).mkdir()
        (target / sub / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        name = "model.safetensors" if sub.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / sub / name))


def sai_file_to_diffusers(src: Path, dst: Path) -> list[str]:
    """SAI single file -> diffusers ``transformer/`` (+ ``vae/``). Returns report lines; text encoder keys are
    dropped and reported (their conversion is not implemented)."""
    outputs, lines, _ = _diffusers_parts(src)
    _atomic_dir(dst, lambda tmp: _write_parts(outputs, tmp))
    return lines


def pipeline_from_checkpoint(src: Path, text_dir: Path, target: Path) -> dict:
    """A diffusers pipeline directory for the reference side of ``check --checkpoint``: the SAI file's MMDiT and
    VAE converted, the text parts linked from ``text_dir``. Returns the SAI parts (for impl, loaded by identity)."""
    import json

    from parity.embedded import model_index

    outputs, _, parts = _diffusers_parts(src)
    if not parts["vae"]:
        raise ValueError(f"{src}: no first_stage_model.* (VAE) keys; the pipeline check needs the VAE")
    _write_parts(outputs, target)
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        if (text_dir / sub).is_dir() and not (target / sub).exists():
            (target / sub).symlink_to((text_dir / sub).resolve(), target_is_directory=True)
    (target / "scheduler").mkdir()
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    (target / "model_index.json").write_text(json.dumps(model_index()))
    return parts


def diffusers_to_sai_file(src: Path, dst: Path) -> list[str]:
    """diffusers directory (``transformer/``, optional ``vae/``) -> one SAI single file."""
    import os
    import tempfile

    from safetensors.torch import save_file

    from impl.checkpoint import PREFIXES
    from impl.weights import read_config, read_weights_dir

    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; refusing to overwrite")
    cfg_path = src / "transformer" / "config.json"
    mc = config_from_diffusers(read_config(cfg_path), str(cfg_path))
    state = {PREFIXES["mmdit"] + k: v for k, v in
             diffusers_to_sai(read_weights_dir(src / "transformer"), mc, str(src / "transformer")).items()}
    lines = [f"transformer: {mc.depth} blocks, hidden {mc.hidden}"]
    if (src / "vae").is_dir():
        vc = vae_config_from_diffusers(read_config(src / "vae" / "config.json"), str(src / "vae" / "config.json"))
        sai_vae = diffusers_to_sai(read_weights_dir(src / "vae"), vc, str(src / "vae"))
        state.update({PREFIXES["vae"] + k: v for k, v in sai_vae.items()})
        lines.append(f"vae: ch {vc.ch}, mult {list(vc.ch_mult)}")
    from impl.text import CLIP_DROP

    for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        if (src / sub).is_dir():
            te = {k: v for k, v in read_weights_dir(src / sub).items() if k not in CLIP_DROP}
            state.update({f"{PREFIXES['text_encoders']}{name}.transformer.{k}": v for k, v in te.items()})
            lines.append(f"{sub} -> text_encoders.{name}: {len(te)} tensors")
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.partial-", dir=dst.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lines
