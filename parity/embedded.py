"""Write the embedded default in the diffusers / transformers directory layout, so the references load the very
same weights and tokenizer files (``text_encoder/``, ``text_encoder_2/``, ``text_encoder_3/``, ``tokenizer/``,
``tokenizer_2/`` with ``!`` as its pad token like the real SD3.5 repositories, ``tokenizer_3/``).

The directory is built once per content hash under ``$SD3PARITY_CACHE`` (default ``~/.cache/sd3-parity``), in a
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
from impl.clip import ClipConfig
from impl.clip_tokenizer import N_MERGES, BPEVocab

LAYOUT_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("SD3PARITY_CACHE", Path.home() / ".cache" / "sd3-parity"))


def clip_config_json(c: ClipConfig, architecture: str) -> dict:
    return {
        "architectures": [architecture], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
        "hidden_size": c.width, "intermediate_size": c.intermediate, "num_attention_heads": c.heads,
        "num_hidden_layers": c.layers, "hidden_act": c.activation, "projection_dim": c.projection_dim,
        "max_position_embeddings": c.max_positions, "layer_norm_eps": c.eps,
        # the legacy value the real SD3 configs carry: transformers then pools at argmax(ids) (QUIRKS T6)
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
    }


def t5_config_json(c) -> dict:
    return {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": c.vocab_size, "d_model": c.d_model,
        "d_kv": c.d_kv, "d_ff": c.d_ff, "num_layers": c.layers, "num_heads": c.heads,
        "relative_attention_num_buckets": c.num_buckets, "relative_attention_max_distance": c.max_distance,
        "layer_norm_epsilon": c.eps, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
        "is_gated_act": True, "is_encoder_decoder": True, "tie_word_embeddings": False, "dropout_rate": 0.0,
        "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32",
    }


def _added(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
            "special": True}


def clip_tokenizer_config(pad: str) -> dict:
    added = {"49406": _added("<|startoftext|>", True), "49407": _added("<|endoftext|>", False)}
    if pad == "!":
        added = {"0": _added("!", False), **added}
    return {"add_prefix_space": False, "added_tokens_decoder": added, "bos_token": "<|startoftext|>",
            "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": "<|endoftext|>",
            "errors": "replace", "model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>"}


def t5_tokenizer_config() -> dict:
    return {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 100, "legacy": True,
            "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_clip_vocab(directory: Path) -> None:
    """``vocab.json`` + ``merges.txt`` from the shipped OpenAI table (byte-identical to the Hub's CLIP files)."""
    vocab = BPEVocab.from_openai_gz(embedded.BPE_GZ)
    lines = gzip.decompress(embedded.BPE_GZ.read_bytes()).decode("utf-8").split("\n")[1 : N_MERGES + 1]
    (directory / "vocab.json").write_text(json.dumps(vocab.encoder, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")


def build(target: Path) -> None:
    from safetensors.torch import save_file

    weights = embedded.text_weights()
    embedded.verify(weights)
    for sub, key, cfg in (("text_encoder", "clip_l", clip_config_json(embedded.CLIP_L, "CLIPTextModelWithProjection")),
                          ("text_encoder_2", "clip_g", clip_config_json(embedded.CLIP_G, "CLIPTextModelWithProjection")),
                          ("text_encoder_3", "t5", t5_config_json(embedded.T5))):
        d = target / sub
        d.mkdir(parents=True)
        _write_json(d / "config.json", cfg)
        state = dict(weights[key])
        if key == "t5":
            state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
        save_file(state, str(d / "model.safetensors"))
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        d = target / sub
        d.mkdir()
        write_clip_vocab(d)
        _write_json(d / "tokenizer_config.json", clip_tokenizer_config(pad))
        _write_json(d / "special_tokens_map.json", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                    "pad_token": pad, "unk_token": "<|endoftext|>"})
    d = target / "tokenizer_3"
    d.mkdir()
    shutil.copyfile(embedded.SPIECE, d / "spiece.model")
    _write_json(d / "tokenizer_config.json", t5_tokenizer_config())
    _write_json(d / "special_tokens_map.json", {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


def model_index() -> dict:
    t, d = "transformers", "diffusers"
    return {"_class_name": "StableDiffusion3Pipeline", "scheduler": [d, "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": [t, "CLIPTextModelWithProjection"], "text_encoder_2": [t, "CLIPTextModelWithProjection"],
            "text_encoder_3": [t, "T5EncoderModel"], "tokenizer": [t, "CLIPTokenizer"], "tokenizer_2": [t, "CLIPTokenizer"],
            "tokenizer_3": [t, "T5Tokenizer"], "transformer": [d, "SD3Transformer2DModel"], "vae": [d, "AutoencoderKL"],
            "image_encoder": [None, None], "feature_extractor": [None, None]}


def build_pipeline(target: Path, family: str) -> None:
    """The text parts plus ``transformer/`` (the tiny ``family`` MMDiT), ``vae/``, ``scheduler/`` and
    ``model_index.json``: a directory ``StableDiffusion3Pipeline.from_pretrained`` loads offline."""
    from safetensors.torch import save_file

    from parity.convert import diffusers_config, diffusers_vae_config, sai_to_diffusers

    build(target)
    config = embedded.MMDIT[family]
    weights = embedded.mmdit_weights(family)
    vae = embedded.vae_weights()
    embedded.verify({f"mmdit-{family}": weights, "vae": vae})
    for sub, cfg, state in (("transformer", diffusers_config(config), sai_to_diffusers(weights, config)),
                            ("vae", diffusers_vae_config(embedded.VAE), sai_to_diffusers(vae, embedded.VAE))):
        (target / sub).mkdir()
        _write_json(target / sub / "config.json", cfg)
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / sub / "diffusion_pytorch_model.safetensors"))
    (target / "scheduler").mkdir()
    _write_json(target / "scheduler" / "scheduler_config.json",
                {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
    _write_json(target / "model_index.json", model_index())


def model_dir(family: str | None = None) -> Path:
    """The embedded default in diffusers layout, built on first use, atomically: the text parts only, or with
    ``family`` (a key of ``impl.embedded.MMDIT``) the whole pipeline."""
    if family is not None and family not in embedded.MMDIT:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(embedded.MMDIT)}")
    key = hashlib.sha256(json.dumps([LAYOUT_VERSION, embedded.manifest()], sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / (f"embedded-{key}" if family is None else f"embedded-{family}-{key}")
    if (target / "tokenizer_3" / "special_tokens_map.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(tmp) if family is None else build_pipeline(tmp, family)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
