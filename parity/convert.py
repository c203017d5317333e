"""Weight conversion between the SAI single-file layout (impl's names) and diffusers, by the rules that
``parity.naming`` derives from its tables (copy, split3, squeeze, swap).

Conversions are strict: every source key is consumed by a rule, every rule finds its keys with the shapes the
config implies, and errors list the missing, unexpected and mis-shaped keys by name. Whole-file conversions
(``sd3parity convert``) are atomic.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from impl.mmdit import MMDiTConfig
from impl.vae import VAEConfig
from impl.weights import WeightError
from parity import naming as N


def mmdit_rules(c: MMDiTConfig) -> list[N.Rule]:
    return N.weight_rules(N.mmdit_rows(c.depth, c.qk_norm, c.dual_attention_layers))


def vae_rules(c: VAEConfig) -> list[N.Rule]:
    return N.weight_rules(N.vae_rows(c.ch_mult, c.num_res_blocks))


def diffusers_vae_config(c: VAEConfig) -> dict:
    """``vae/config.json`` of diffusers' ``AutoencoderKL`` as SD3 uses it (no quant convs)."""
    n = len(c.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [c.ch * m for m in c.ch_mult], "layers_per_block": c.num_res_blocks,
            "act_fn": "silu", "latent_channels": c.z_channels, "norm_num_groups": c.groups, "sample_size": 64,
            "scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor, "use_quant_conv": False,
            "use_post_quant_conv": False, "mid_block_add_attention": True, "force_upcast": True}


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


def _rules(c) -> list[N.Rule]:
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
        if r.transform == "split3" and len({tuple(p.shape) for p in parts}) != 1:
            raise WeightError(f"{source}: {', '.join(r.diffusers)} differ in shape "
                              f"({sorted({tuple(p.shape) for p in parts})})")
        out[r.sai] = combiner(r)(parts)
    _check_shapes(out, c, source)
    return out


def combiner(r: N.Rule):
    """The SAI tensor of rule ``r`` from its diffusers tensors (in ``r.diffusers`` order)."""
    if r.transform == "split3":
        return lambda parts: torch.cat(parts, dim=0)
    if r.transform == "squeeze":
        return lambda parts: parts[0][:, :, None, None]
    return lambda parts: _swap(parts[0]) if r.transform == "swap" else parts[0]


def clip_config_json(c, architecture: str = "CLIPTextModelWithProjection") -> dict:
    """``text_encoder*/config.json`` (transformers ``CLIPTextConfig``) for an impl CLIP config."""
    return {
        "architectures": [architecture], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
        "hidden_size": c.width, "intermediate_size": c.intermediate, "num_attention_heads": c.heads,
        "num_hidden_layers": c.layers, "hidden_act": c.activation, "projection_dim": c.projection_dim,
        "max_position_embeddings": c.max_positions, "layer_norm_eps": c.eps,
        # the legacy value the real SD3 configs carry: transformers then pools at argmax(ids) (QUIRKS T6)
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
    }


def t5_config_json(c) -> dict:
    """``text_encoder_3/config.json`` (transformers ``T5Config``) for an impl T5 config."""
    return {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": c.vocab_size, "d_model": c.d_model,
        "d_kv": c.d_kv, "d_ff": c.d_ff, "num_layers": c.layers, "num_heads": c.heads,
        "relative_attention_num_buckets": c.num_buckets, "relative_attention_max_distance": c.max_distance,
        "layer_norm_epsilon": c.eps, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
        "is_gated_act": True, "is_encoder_decoder": True, "tie_word_embeddings": False, "dropout_rate": 0.0,
        "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32",
    }


def diffusers_config(c: MMDiTConfig) -> dict:
    """``transformer/config.json`` of ``SD3Transformer2DModel`` for this config."""
    return {"_class_name": "SD3Transformer2DModel", "sample_size": c.pos_embed_max_size * c.patch // 2,
            "patch_size": c.patch, "in_channels": c.in_channels, "out_channels": c.out_channels,
            "num_layers": c.depth, "attention_head_dim": c.head_dim, "num_attention_heads": c.heads,
            "joint_attention_dim": c.context_dim, "caption_projection_dim": c.hidden,
            "pooled_projection_dim": c.pooled_dim, "pos_embed_max_size": c.pos_embed_max_size,
            "dual_attention_layers": list(c.dual_attention_layers), "qk_norm": "rms_norm" if c.qk_norm else None}


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


def given_configs(config_dir: Path | None) -> dict:
    """The configs of a diffusers directory, parsed by impl's readers: the values a single file's shapes lack."""
    from impl.clip import ClipConfig
    from impl.t5 import T5Config
    from impl.weights import read_config

    out = {}
    if config_dir is None:
        return out
    for key, sub, parse in (("mmdit", "transformer", MMDiTConfig.from_diffusers), ("vae", "vae", VAEConfig.from_diffusers),
                            ("clip_l", "text_encoder", ClipConfig.from_hf), ("clip_g", "text_encoder_2", ClipConfig.from_hf),
                            ("t5", "text_encoder_3", T5Config.from_hf)):
        path = config_dir / sub / "config.json"
        if path.is_file():
            out[key] = parse(read_config(path), str(path))
    return out


def _diffusers_parts(src: Path, config_dir: Path | None = None) -> tuple[list, list[str], dict]:
    """Read an SAI single file and convert its parts to diffusers state dicts with configs: from the file's shapes,
    with the values no shape carries from ``config_dir`` (else inferred, and said in the returned lines)."""
    from impl.checkpoint import infer_mmdit, infer_vae, match_presets, read_sai_checkpoint

    given = given_configs(config_dir)
    parts = read_sai_checkpoint(src)
    mc, notes = infer_mmdit(parts["mmdit"], f"{src} (model.diffusion_model.*)", given.get("mmdit"))
    outputs = [("transformer", diffusers_config(mc), sai_to_diffusers(parts["mmdit"], mc, f"{src} (MMDiT)"))]
    lines = [f"transformer: {mc.depth} blocks, hidden {mc.hidden}, {mc.heads} heads, qk_norm {mc.qk_norm}, dual "
             f"layers {list(mc.dual_attention_layers)}; preset: {', '.join(match_presets(mc)) or 'none (not a released size)'}"]
    if parts["vae"]:
        vc, vnotes = infer_vae(parts["vae"], f"{src} (first_stage_model.*)", given.get("vae"))
        notes += vnotes
        outputs.append(("vae", diffusers_vae_config(vc), sai_to_diffusers(parts["vae"], vc, f"{src} (VAE)")))
        lines.append(f"vae: ch {vc.ch}, mult {list(vc.ch_mult)}, {vc.num_res_blocks} res blocks, {vc.z_channels} channels")
    if parts["text_encoders"]:
        from impl.checkpoint import load_text_encoders

        models, states, tnotes, _ = load_text_encoders(parts["text_encoders"], str(src), given)
        notes += tnotes
        for name, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
            if name in models:
                c = models[name].config
                cfg = t5_config_json(c) if name == "t5" else clip_config_json(c, "CLIPTextModelWithProjection")
                outputs.append((sub, cfg, states[name]))
                lines.append(f"{sub}: {name}, " + (f"{c.layers} layers, d_model {c.d_model}, {c.heads} heads"
                                                   if name == "t5" else
                                                   f"{c.layers} layers, width {c.width}, {c.heads} heads"))
        lines.append("tokenizer folders are not part of a single file: take them from the model's repository")
    return outputs, lines + [f"note: {n}" for n in notes], parts


def _write_parts(outputs: list, target: Path) -> None:
    import json

    from safetensors.torch import save_file

    for sub, cfg, state in outputs:
        (target / sub).mkdir()
        (target / sub / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        name = "model.safetensors" if sub.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / sub / name))


def sai_file_to_diffusers(src: Path, dst: Path, config_dir: Path | None = None) -> list[str]:
    """SAI single file -> diffusers ``transformer/``, ``vae/``, ``text_encoder*/``. Returns report lines, with
    every config value that was inferred rather than read from ``config_dir``."""
    outputs, lines, _ = _diffusers_parts(src, config_dir)
    _atomic_dir(dst, lambda tmp: _write_parts(outputs, tmp))
    return lines


def diffusers_to_sai_file(src: Path, dst: Path) -> list[str]:
    """diffusers directory (``transformer/``, optional ``vae/``) -> one SAI single file."""
    from impl.checkpoint import PREFIXES
    from impl.weights import MODEL_WEIGHTS, TEXT_WEIGHTS, read_config, read_weights_dir

    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; refusing to overwrite")
    cfg_path = src / "transformer" / "config.json"
    mc = MMDiTConfig.from_diffusers(read_config(cfg_path), str(cfg_path))
    state = {PREFIXES["mmdit"] + k: v for k, v in
             diffusers_to_sai(read_weights_dir(src / "transformer", MODEL_WEIGHTS), mc, str(src / "transformer")).items()}
    lines = [f"transformer: {mc.depth} blocks, hidden {mc.hidden}"]
    if (src / "vae").is_dir():
        vc = VAEConfig.from_diffusers(read_config(src / "vae" / "config.json"), str(src / "vae" / "config.json"))
        sai_vae = diffusers_to_sai(read_weights_dir(src / "vae", MODEL_WEIGHTS), vc, str(src / "vae"))
        state.update({PREFIXES["vae"] + k: v for k, v in sai_vae.items()})
        lines.append(f"vae: ch {vc.ch}, mult {list(vc.ch_mult)}")
    from impl.text import CLIP_DROP, check_encoder_folder

    for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        if (src / sub).is_dir():
            te = {k: v for k, v in read_weights_dir(src / sub, TEXT_WEIGHTS).items() if k not in CLIP_DROP}
            check_encoder_folder(src / sub, te)  # the weights must be the model the folder's config describes
            if name == "t5xxl" and "encoder.embed_tokens.weight" not in te and "shared.weight" in te:
                te["encoder.embed_tokens.weight"] = te["shared.weight"].clone()  # the name SAI-layout readers read
            state.update({f"{PREFIXES['text_encoders']}{name}.transformer.{k}": v for k, v in te.items()})
            lines.append(f"{sub} -> text_encoders.{name}: {len(te)} tensors")
    _atomic_file(dst, state)
    return lines


def _atomic_file(dst: Path, state: dict[str, Tensor]) -> None:
    """``state`` saved as ``dst`` through a sibling temporary file renamed into place; nothing is left on failure."""
    import os
    import tempfile

    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.partial-", dir=dst.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


FP8_MAX = 448.0  # the largest float8_e4m3fn value


def scaled_fp8_file(src: Path, dst: Path) -> list[str]:
    """An SAI single file -> the same file with its MMDiT's linear weights (every 2-D ``*.weight`` of
    ``model.diffusion_model.*``) and, when it holds one, its T5's (``text_encoders.t5xxl.transformer.*``, the
    attention and feed-forward weights) in ComfyUI's scaled-fp8 layout: ``float8_e4m3fn`` values ``w / s`` with
    ``s = max|w| / 448`` stored as ``L.scale_weight`` (float32), and a ``scaled_fp8`` marker under each quantized
    model's prefix. Every other tensor is copied as it is."""
    from impl.checkpoint import PREFIXES, TEXT_PREFIXES, read_sai_checkpoint
    from impl.quant import MARKER, is_quantized

    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; refusing to overwrite")
    parts = read_sai_checkpoint(src)
    if is_quantized(parts["mmdit"]):
        raise WeightError(f"{src}: its MMDiT is already quantized")
    t5 = TEXT_PREFIXES["t5"]
    has_t5 = any(k.startswith(t5) for k in parts["text_encoders"])

    def linear(part: str, k: str, v: Tensor) -> bool:
        if not (k.endswith(".weight") and v.ndim == 2):
            return False
        return part == "mmdit" or (k.startswith(t5) and (".SelfAttention." in k or ".DenseReluDense." in k)
                                   and "relative_attention" not in k)

    state, n = {}, {"mmdit": 0, "text_encoders": 0}
    for part, prefix in PREFIXES.items():
        for k, v in parts[part].items():
            if part in n and linear(part, k, v):
                w = v.float()
                amax = w.abs().max()
                scale = amax / FP8_MAX if amax > 0 else torch.ones(())
                state[prefix + k] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                state[f"{prefix}{k[:-len('weight')]}scale_weight"] = scale.reshape(()).float()
                n[part] += 1
            else:
                state[prefix + k] = v
    state[PREFIXES["mmdit"] + MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if has_t5:
        state[PREFIXES["text_encoders"] + t5 + MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    _atomic_file(dst, state)
    return [f"model.diffusion_model: {n['mmdit']} linear weights in float8_e4m3fn with per-tensor scales "
            "(ComfyUI's scaled_fp8 layout)"] + \
        ([f"text_encoders.{t5.rstrip('.')}: {n['text_encoders']} linear weights likewise"] if has_t5 else []) + \
        ["every other tensor as it was"]
