"""The embedded default: tiny deterministic models and the tokenizer files shipped in ``impl/embedded/``.

Configs are committed files (``embedded/model/``, in the diffusers / transformers layout) that impl parses with
its own config readers and the references with theirs. Weights come from a counter-based generator (SplitMix64
over the tensor name and element index, mapped to float32 with exact arithmetic), so the bytes are the same on any
torch or numpy version; ``manifest.json`` records their sha256 (and that of every committed file) and ``verify``
checks it. Shipped data: OpenAI's CLIP BPE table (``bpe_simple_vocab_16e6.txt.gz``, MIT licence, copied from
the clip-anytorch 2.6.0 wheel, byte-identical to OpenAI's) and a tiny T5 Unigram ``spiece.model`` trained by
``parity/make_spiece.py``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from impl.clip import ClipConfig
from impl.mmdit import MMDiTConfig
from impl.t5 import T5Config
from impl.vae import VAEConfig
from impl.weights import WeightError

DATA = Path(__file__).resolve().parent / "embedded"
BPE_GZ = DATA / "bpe_simple_vocab_16e6.txt.gz"
SPIECE = DATA / "spiece.model"
UNICODE_DELTA = DATA / "unicode_delta.json"
MODEL = DATA / "model"  # the committed configs and tokenizer settings, in the diffusers / transformers layout
FAMILIES = ("sd3-medium", "sd3.5-large", "sd3.5-medium")


def config_file(rel: str) -> dict:
    """A committed config of the embedded default (``text_encoder/config.json``, ``transformer/sd3-medium.json``,
    ...), parsed as JSON: impl reads it with its own config parsers, the references with theirs."""
    from impl.weights import read_config

    return read_config(MODEL / rel)


def _configs():
    src = lambda rel: f"impl/embedded/model/{rel}"  # noqa: E731
    clip_l = ClipConfig.from_hf(config_file("text_encoder/config.json"), src("text_encoder/config.json"))
    clip_g = ClipConfig.from_hf(config_file("text_encoder_2/config.json"), src("text_encoder_2/config.json"))
    t5 = T5Config.from_hf(config_file("text_encoder_3/config.json"), src("text_encoder_3/config.json"))
    mmdit = {f: MMDiTConfig.from_diffusers(config_file(f"transformer/{f}.json"), src(f"transformer/{f}.json"))
             for f in FAMILIES}
    vae = VAEConfig.from_diffusers(config_file("vae/config.json"), src("vae/config.json"))
    return clip_l, clip_g, t5, mmdit, vae


# CLIP-L and CLIP-G differ in width, heads, depth, activation and pad id so a swap is caught; the tiny transformers
# are shaped like each family (the SAI rule: hidden = 64 * depth, heads = depth), their context width the T5 width
# and their pooled width the two CLIP projections (32 + 48); the VAE downscales 8x like the real one.
CLIP_L, CLIP_G, T5, MMDIT, VAE = _configs()

_MASK = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(_MASK)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(_MASK)
    return x ^ (x >> np.uint64(31))


def uniform(name: str, shape: tuple[int, ...], scale: float, offset: float = 0.0) -> torch.Tensor:
    """offset + scale * U[-1, 1) on a 2**-23 grid, float32, a pure function of (name, shape)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    n = int(np.prod(shape)) if shape else 1
    with np.errstate(over="ignore"):
        bits = _splitmix(np.arange(n, dtype=np.uint64) + np.uint64(seed))
    unit = (bits >> np.uint64(40)).astype(np.float64) / float(1 << 23) - 1.0  # exact: 24-bit integers / 2**23
    values = (offset + scale * unit).astype(np.float32)  # one rounding, IEEE-defined
    return torch.from_numpy(values.reshape(shape))


def _init(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return uniform(name, shape, 0.1, 1.0)
    if leaf == "bias":
        return uniform(name, shape, 0.02)
    if "embedding" in name or name.startswith("shared") or name.endswith(".pos_embed"):
        return uniform(name, shape, 0.5)
    if ".ln_" in name:  # qk RMSNorm weights
        return uniform(name, shape, 0.1, 1.0)
    if len(shape) == 4:  # patch conv: unit variance over in_channels * k * k
        return uniform(name, shape, 3.0 ** 0.5 / (shape[1] * shape[2] * shape[3]) ** 0.5)
    if "relative_attention_bias" in name:
        return uniform(name, shape, 1.0)
    return uniform(name, shape, 3.0 ** 0.5 / shape[-1] ** 0.5)  # unit variance through a Linear


def text_weights() -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the tiny ``clip_l``, ``clip_g`` and ``t5`` encoders (impl / checkpoint key names)."""
    from impl.clip import ClipTextEncoder
    from impl.t5 import T5Encoder

    out = {}
    for key, model in (("clip_l", ClipTextEncoder(CLIP_L)), ("clip_g", ClipTextEncoder(CLIP_G)), ("t5", T5Encoder(T5))):
        out[key] = {k: _init(f"{key}.{k}", tuple(v.shape)) for k, v in sorted(model.state_dict().items())}
    return out


def mmdit_weights(family: str) -> dict[str, torch.Tensor]:
    """State dict (SAI key names, no prefix) of the tiny transformer of ``family`` (a key of ``MMDIT``)."""
    from impl.mmdit import MMDiT

    if family not in MMDIT:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(MMDIT)}")
    model = MMDiT(MMDIT[family])
    return {k: _init(f"mmdit-{family}.{k}", tuple(v.shape)) for k, v in sorted(model.state_dict().items())}


def vae_weights() -> dict[str, torch.Tensor]:
    """State dict (SAI key names under ``first_stage_model.``, no prefix) of the tiny VAE."""
    from impl.vae import VAE as Model

    return {k: _init(f"vae.{k}", tuple(v.shape)) for k, v in sorted(Model(VAE).state_dict().items())}


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, little-endian bytes) of every tensor, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def manifest() -> dict:
    return json.loads((DATA / "manifest.json").read_text())


def verify(weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Raise if generated weights or shipped files differ from the recorded sha256."""
    m = manifest()
    for key, state in weights.items():
        got, want = digest(state), m["weights"].get(key)
        if got != want:
            raise WeightError(f"embedded {key} weights sha256 {got} != recorded {want}: the generator changed")
    for name, want in m["files"].items():
        got = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
        if got != want:
            raise WeightError(f"impl/embedded/{name}: sha256 {got} != recorded {want}")


if __name__ == "__main__":  # developer tool: print the manifest for the current generator and shipped files
    print(json.dumps({
        "weights": {**{k: digest(v) for k, v in text_weights().items()},
                    **{f"mmdit-{f}": digest(mmdit_weights(f)) for f in MMDIT}, "vae": digest(vae_weights())},
        "files": {str(p.relative_to(DATA)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in (BPE_GZ, SPIECE, UNICODE_DELTA, *sorted(MODEL.rglob("*.json")))},
        "provenance": {
            BPE_GZ.name: "OpenAI CLIP BPE merges (MIT licence, (c) 2021 OpenAI), copied unchanged from the "
                         "clip-anytorch 2.6.0 wheel (clip/bpe_simple_vocab_16e6.txt.gz)",
            SPIECE.name: "tiny T5 Unigram model (320 pieces, nmt_nfkc) trained by parity/make_spiece.py with "
                         "sentencepiece 0.2.3",
            "model/": "configs and tokenizer settings of the tiny models, written for this project",
            UNICODE_DELTA.name: "the Rust CLIP tokenizer's classes and lower-casing of code points unassigned in "
                                "Unicode 14, and the marks its NFC orders as class 0, probed with tokenizers 0.23.3 "
                                "by parity/make_unicode_delta.py",
        },
    }, indent=2))
