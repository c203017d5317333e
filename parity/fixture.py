"""Synthetic full-size checkpoints: the released configurations' exact shapes, deterministic values, nothing
downloaded. ``sd3parity fixture PRESET OUT [--layout diffusers|sai] [--dtype bfloat16] [--seed 0]``.

Every tensor's values depend only on the seed and the tensor's canonical name (impl's / transformers' name, with
the component), drawn by a generator seeded from their sha256, so both layouts hold the same numbers (diffusers'
q, k, v are the thirds of the SAI file's fused qkv) and a rerun on the same torch version writes the same bytes.
Scales keep activations finite through every layer: weights N(0, 1/fan_in), norm weights near 1, biases and
embeddings small.

Layouts (the names the released files use):

* ``diffusers``: ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (CLIP-G),
  ``text_encoder_3/`` (T5-XXL, ``shared`` and ``encoder.embed_tokens`` both stored), each with its config, the
  tokenizer folders, ``scheduler/`` and ``model_index.json``;
* ``sai``: ``<preset>.safetensors`` (``model.diffusion_model.*``, ``first_stage_model.*`` and
  ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``, like the ``incl_clips_t5xxl`` single files) beside the same
  configs and tokenizer folders, which the harness reads for what a single file does not carry.

The tokenizers are the embedded default's (the real CLIP BPE table; a tiny T5 vocabulary whose ids all fit T5-XXL's
32128-row table). Files are written tensor by tensor (at most one tensor in memory), in a temporary directory
renamed into place; ``fixture.json`` lists the preset, the seed and every file's sha256.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from impl.clip import ClipConfig
from impl.t5 import T5Config

CLIP_L = ClipConfig(width=768, heads=12, layers=12, intermediate=3072, activation="quick_gelu", projection_dim=768)
CLIP_G = ClipConfig(width=1280, heads=20, layers=32, intermediate=5120, activation="gelu", projection_dim=1280)
T5_XXL = T5Config(vocab_size=32128, d_model=4096, d_kv=64, heads=64, d_ff=10240, layers=24)
LAYOUTS = ("diffusers", "sai")
DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"), "float32": (torch.float32, "F32")}
NORMS = ("norm", "ln_q", "ln_k", "layer_norm", "ln_")  # 1-D weights near 1 (LayerNorm, RMSNorm, GroupNorm)
EMBEDDINGS = ("token_embedding", "position_embedding", "shared.weight", "embed_tokens", "relative_attention_bias",
              "pos_embed")


def presets() -> dict:
    from impl.checkpoint import PRESETS

    return PRESETS


# ---------------------------------------------------------------------------------------------- values

def value(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``name`` (canonical: component and impl's name) of a fixture: a function of (seed, name, shape)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if any(e in name for e in EMBEDDINGS):
        scale = 0.5 if name.startswith("t5:") and "relative" not in name else 0.02
        x = x * scale
    elif len(shape) == 1 and leaf == "weight" and any(n in name for n in NORMS):
        x = 1.0 + 0.02 * x
    elif len(shape) == 1:
        x = 0.02 * x
    else:
        x = x / math.sqrt(math.prod(shape[1:]))
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- plan

def _state_shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def components(preset: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """Canonical names and shapes per component (impl's modules on the meta device, nothing allocated)."""
    from impl.checkpoint import SD3_VAE
    from impl.clip import ClipTextEncoder
    from impl.mmdit import MMDiT
    from impl.t5 import T5Encoder
    from impl.vae import VAE

    with torch.device("meta"):
        return {"mmdit": _state_shapes(MMDiT(presets()[preset])), "vae": _state_shapes(VAE(SD3_VAE)),
                "clip_l": _state_shapes(ClipTextEncoder(CLIP_L)), "clip_g": _state_shapes(ClipTextEncoder(CLIP_G)),
                "t5": _state_shapes(T5Encoder(T5_XXL))}


Entry = tuple[str, tuple[int, ...], str, tuple[int, ...], str]  # stored name, shape, canonical, its shape, transform


def plan(preset: str, layout: str) -> dict[str, list[Entry]]:
    """File (relative path) -> its tensors: (stored name, stored shape, canonical name, canonical shape, the
    transform from the canonical tensor: ``copy``, ``split3.K``, ``squeeze``, ``swap``)."""
    from impl.checkpoint import PREFIXES, SD3_VAE, TEXT_PREFIXES
    from parity.convert import _rules

    if preset not in presets():
        raise ValueError(f"fixture preset {preset!r}: expected one of {', '.join(presets())}")
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    comps = components(preset)
    text = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
    if layout == "sai":
        entries = [(PREFIXES["mmdit"] + k, s, f"mmdit:{k}", s, "copy") for k, s in comps["mmdit"].items()]
        entries += [(PREFIXES["vae"] + k, s, f"vae:{k}", s, "copy") for k, s in comps["vae"].items()]
        for comp in text:
            entries += [(PREFIXES["text_encoders"] + TEXT_PREFIXES[comp] + k, s, f"{comp}:{k}", s, "copy")
                        for k, s in comps[comp].items()]
        return {f"{preset}.safetensors": entries}
    out: dict[str, list[Entry]] = {}
    for comp, config, sub in (("mmdit", presets()[preset], "transformer"), ("vae", SD3_VAE, "vae")):
        entries = []
        for rule in _rules(config):
            shape = comps[comp][rule.sai]
            for k, name in enumerate(rule.diffusers):
                if rule.transform == "split3":
                    entries.append((name, (shape[0] // 3, *shape[1:]), f"{comp}:{rule.sai}", shape, f"split3.{k}"))
                elif rule.transform == "squeeze":
                    entries.append((name, shape[:2], f"{comp}:{rule.sai}", shape, "squeeze"))
                else:
                    entries.append((name, shape, f"{comp}:{rule.sai}", shape, rule.transform))
        out[f"{sub}/diffusion_pytorch_model.safetensors"] = entries
    for comp, sub in text.items():
        entries = [(k, s, f"{comp}:{k}", s, "copy") for k, s in comps[comp].items()]
        if comp == "t5":  # transformers ties them; the SD3 repositories store both names
            entries.append(("encoder.embed_tokens.weight", comps["t5"]["shared.weight"], "t5:shared.weight",
                            comps["t5"]["shared.weight"], "copy"))
        out[f"{sub}/model.safetensors"] = entries
    return out


def _transformed(t: torch.Tensor, transform: str) -> torch.Tensor:
    if transform.startswith("split3."):
        return t.chunk(3, dim=0)[int(transform.split(".")[1])]
    if transform == "squeeze":
        return t[:, :, 0, 0]
    if transform == "swap":
        return torch.cat(t.chunk(2, dim=0)[::-1])
    return t


# ---------------------------------------------------------------------------------------------- files

def write_safetensors(path: Path, entries: list[Entry], seed: int, dtype: str) -> str:
    """Write one safetensors file tensor by tensor; returns its sha256."""
    from parity.stream import write_tensors

    torch_dtype = DTYPES[dtype][0]
    by_name = {e[0]: e for e in entries}
    cache: tuple[str, torch.Tensor] | None = None

    def get(name: str) -> torch.Tensor:
        nonlocal cache
        _, shape, canonical, canonical_shape, transform = by_name[name]
        if cache is None or cache[0] != canonical:
            cache = (canonical, value(canonical, canonical_shape, seed, torch_dtype))
        return _transformed(cache[1], transform)
    return write_tensors(path, [(name, torch_dtype, tuple(shape)) for name, shape, *_ in entries], get)


def _configs(target: Path, preset: str) -> None:
    """Configs, tokenizer folders, scheduler and model index (the embedded default's files where sizes agree)."""
    from impl import embedded
    from impl.checkpoint import SD3_VAE
    from parity.convert import clip_config_json, diffusers_config, diffusers_vae_config, t5_config_json
    from parity.embedded import write_clip_vocab

    configs = {"transformer": diffusers_config(presets()[preset]), "vae": diffusers_vae_config(SD3_VAE),
               "text_encoder": clip_config_json(CLIP_L), "text_encoder_2": clip_config_json(CLIP_G),
               "text_encoder_3": t5_config_json(T5_XXL)}
    for sub, cfg in configs.items():
        (target / sub).mkdir(exist_ok=True)
        (target / sub / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for rel in ("scheduler/scheduler_config.json", "model_index.json"):
        (target / rel).parent.mkdir(exist_ok=True)
        shutil.copyfile(embedded.MODEL / rel, target / rel)
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        (target / sub).mkdir()
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(embedded.MODEL / sub / name, target / sub / name)
    for sub in ("tokenizer", "tokenizer_2"):
        write_clip_vocab(target / sub)
    shutil.copyfile(embedded.SPIECE, target / "tokenizer_3" / "spiece.model")


def write(preset: str, out: Path, layout: str = "diffusers", dtype: str = "bfloat16", seed: int = 0,
          progress=None) -> dict:
    """Write the fixture at ``out`` (which must not exist); returns its manifest (``fixture.json``)."""
    from parity.convert import _atomic_dir

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    files = plan(preset, layout)
    manifest = {"preset": preset, "layout": layout, "dtype": dtype, "seed": seed, "torch": torch.__version__,
                "files": {}}

    def fill(tmp: Path) -> None:
        _configs(tmp, preset)
        for rel, entries in files.items():
            manifest["files"][rel] = write_safetensors(tmp / rel, entries, seed, dtype)
            if progress is not None:
                progress(rel)
        (tmp / "fixture.json").write_text(json.dumps(manifest, indent=1) + "\n")
    _atomic_dir(out, fill)
    return manifest


def plan_size(preset: str, layout: str, dtype: str = "bfloat16") -> int:
    """Bytes of tensor data the fixture holds."""
    size = torch.empty((), dtype=DTYPES[dtype][0]).element_size()
    return sum(math.prod(shape) * size for entries in plan(preset, layout).values() for _, shape, *_ in entries)
