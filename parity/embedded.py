"""The embedded default as files, so that every side loads the very same bytes its own way.

``model_dir()`` is the text parts in the diffusers / transformers layout (``text_encoder*/``, ``tokenizer*/``);
``model_dir(family)`` the whole pipeline of one tiny family (adds ``transformer/``, ``vae/``, ``scheduler/``,
``model_index.json``) plus ``<family>.safetensors``, the same MMDiT and VAE as an SAI single file
(``model.diffusion_model.*``, ``first_stage_model.*``), the form the SD3.5 code reads. Configs and tokenizer
settings are copied from the committed files in ``impl/embedded/model/``; the references parse them with their own
readers. The weights are impl's generated ones: text encoders and the SAI file in their native names, the diffusers
folders through ``parity.convert`` (so a converter fault shows up as a divergence, never on both sides).

Directories are built once per content hash under ``$SD3PARITY_CACHE`` (default ``~/.cache/sd3-parity``), in a
temporary directory renamed into place, so an interrupted build never leaves a half-written model behind.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from impl import embedded
from impl.clip_tokenizer import N_MERGES, BPEVocab

LAYOUT_VERSION = 2
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def cache_root() -> Path:
    return Path(os.environ.get("SD3PARITY_CACHE", Path.home() / ".cache" / "sd3-parity"))


def write_clip_vocab(directory: Path) -> None:
    """``vocab.json`` + ``merges.txt`` from the shipped OpenAI table (byte-identical to the Hub's CLIP files)."""
    vocab = BPEVocab.from_openai_gz(embedded.BPE_GZ)
    lines = gzip.decompress(embedded.BPE_GZ.read_bytes()).decode("utf-8").split("\n")[1 : N_MERGES + 1]
    (directory / "vocab.json").write_text(json.dumps(vocab.encoder, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")


def _copy_config(rel: str, target: Path, name: str | None = None) -> None:
    dst = target / (name or rel)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(embedded.MODEL / rel, dst)


def build(target: Path) -> None:
    from safetensors.torch import save_file

    weights = embedded.text_weights()
    embedded.verify(weights)
    for sub, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5")):
        _copy_config(f"{sub}/config.json", target)
        state = dict(weights[key])
        if key == "t5":  # transformers ties them; both names are stored, as in the SD3 repositories
            state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
        save_file(state, str(target / sub / "model.safetensors"))
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            _copy_config(f"{sub}/{name}", target)
    for sub in ("tokenizer", "tokenizer_2"):
        write_clip_vocab(target / sub)
    shutil.copyfile(embedded.SPIECE, target / "tokenizer_3" / "spiece.model")


def build_pipeline(target: Path, family: str) -> None:
    """The text parts plus ``transformer/`` (the tiny ``family`` MMDiT), ``vae/``, ``scheduler/``,
    ``model_index.json`` and ``<family>.safetensors``."""
    from safetensors.torch import save_file

    from impl.checkpoint import PREFIXES
    from parity.convert import sai_to_diffusers

    build(target)
    weights, vae = embedded.mmdit_weights(family), embedded.vae_weights()
    embedded.verify({f"mmdit-{family}": weights, "vae": vae})
    _copy_config(f"transformer/{family}.json", target, "transformer/config.json")
    _copy_config("vae/config.json", target)
    _copy_config("scheduler/scheduler_config.json", target)
    _copy_config("model_index.json", target)
    for sub, state, config in (("transformer", weights, embedded.MMDIT[family]), ("vae", vae, embedded.VAE)):
        save_file({k: v.contiguous() for k, v in sai_to_diffusers(state, config).items()},
                  str(target / sub / "diffusion_pytorch_model.safetensors"))
    single = {**{PREFIXES["mmdit"] + k: v for k, v in weights.items()},
              **{PREFIXES["vae"] + k: v for k, v in vae.items()}}
    save_file({k: v.contiguous() for k, v in single.items()}, str(target / f"{family}.safetensors"))


def _key() -> str:
    return hashlib.sha256(json.dumps([LAYOUT_VERSION, embedded.manifest()], sort_keys=True).encode()).hexdigest()[:16]


def model_dir(family: str | None = None) -> Path:
    """The embedded default in diffusers layout, built on first use, atomically: the text parts only, or with
    ``family`` (a key of ``impl.embedded.MMDIT``) the whole pipeline. The cache key covers every committed input
    (the manifest lists the sha256 of the configs, tokenizer files and generated weights)."""
    if family is not None and family not in embedded.MMDIT:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(embedded.MMDIT)}")
    embedded.verify({})  # the committed files are those the manifest names
    target = cache_root() / (f"embedded-{_key()}" if family is None else f"embedded-{family}-{_key()}")
    done = target / ("model_index.json" if family is not None else "tokenizer_3/spiece.model")
    if done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(tmp) if family is None else build_pipeline(tmp, family)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not done.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def single_file(family: str) -> Path:
    """The SAI single file of an embedded family (inside its pipeline directory)."""
    return model_dir(family) / f"{family}.safetensors"
